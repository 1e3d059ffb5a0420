"""What the plan shows of a run's teacher-output cache: where it is and how far it is written, its size on disk for
the planned data, and what it saves (the teachers' weights off the device, their views off the host)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from compress.config import RunConfig
from compress.memory import bytes_per_sample as batch_bytes_per_sample
from compress.memory import compute_precision, gib
from compress.plan.facts import ModelFacts
from compress.teacher_cache.identity import bytes_per_sample, cache_root, estimated_bytes, num_shards
from compress.teacher_cache.store import COMPLETE, MANIFEST, shard_name


def _written(root: Path) -> tuple[str, int | None]:
    """How far the cache at ``root`` is written (its completion marker, else its manifest's shards counted in one
    listing), and its sample count."""
    manifest = root / MANIFEST
    if not manifest.is_file():
        return ("not written yet: the run writes it before training (or `clip-compress cache-teacher CONFIG`, "
                "`--dispatch` for a SLURM array of parts)"), None
    data = json.loads(manifest.read_text())
    total = int(data["num_shards"])  # the manifest's cut: a config's other shard_size does not re-cut it
    names = set() if (root / COMPLETE).is_file() else set(os.listdir(root))
    done = total if not names else sum(1 for s in range(total) if shard_name(s) in names)
    if done >= total:
        return f"complete: {data['num_samples']} samples in {total} shards (read, not written)", data["num_samples"]
    return f"{done} of {total} shards written: the run writes the rest before training", int(data["num_samples"])


def cache_lines(cfg: RunConfig, teachers: list[ModelFacts]) -> list[str]:
    """The plan's lines on ``teacher_cache`` (none without the section)."""
    cache = cfg.teacher_cache
    if cache is None:
        return []
    plural = "s" if cache.num_augmentations != 1 else ""
    views = f"{cache.num_augmentations} fixed view{plural} a sample (seed {cache.seed})"
    if not cache.reads_cache:
        return [f"teacher cache  none read: mode online, the teacher runs on {views}"]
    root = cache_root(cfg)
    planned = cfg.data.train.num_samples
    state, written = _written(root)
    samples = planned or written
    lines = [f"teacher cache  {root}", f"               {state}"]
    shapes = [t.shape for t in teachers]
    if any(s is None for s in shapes):
        lines.append(f"               {views}, {cache.dtype}; its size is unknown (a teacher's size is unknown)")
        return lines
    dims = [s.embed_dim for s in shapes]  # type: ignore[union-attr]
    per = bytes_per_sample(dims, dims, cache.num_augmentations, cache.dtype, cache.outputs)
    total = estimated_bytes(samples or 0, dims, dims, cache.num_augmentations, cache.dtype, cache.outputs)
    size = (f" x {samples} samples = ~{gib(total)} on disk in "
            f"{num_shards(samples, cache.shard_size)} shard folders" if samples
            else " (set data.train.num_samples for the total)")
    lines.append(f"               {views}, {', '.join(cache.outputs)} in {cache.dtype}: {per} B a sample{size}")
    compute = 4 if compute_precision(cfg) == "fp32" else 2
    weights = sum(compute * s.parameters for s in shapes)  # type: ignore[union-attr]
    view_bytes = sum(batch_bytes_per_sample(s.image_size, None, 0) for s in shapes)  # type: ignore[union-attr]
    lines.append(f"               saved: the teachers never reach the device (~{gib(weights)} of weights per process "
                 f"and their forward every step) and make no view on the host (up to {view_bytes // 1024} KiB a "
                 "sample; none where a teacher's view is the student's)")
    return lines
