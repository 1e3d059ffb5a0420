"""What the run id hashes, as data: the settings that do not change the result (left out), numbers in one form,
the fingerprints of local model files, and the hash itself.

The run id hashes the resolved config: plug-in specs with their constructor defaults filled in (so
``scale: 50`` written or omitted give one id; that resolution is the plug-ins' knowledge,
:mod:`compress.recipe.identity`), numbers in one form (``50`` and ``50.0`` are equal), and without the
settings that do not change the result (below). Sweeps skip a finished run by this id, so leaving out a key
that does change the result would be a bug; when in doubt a key stays in.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from compress.config.schema import RunConfig

#: sections that describe where and how a run executes, not what it computes
NON_IDENTITY_SECTIONS = ("output", "dispatch")

#: keys that change how a run executes or reports, not the experiment. ``eval.batch_size`` and
#: ``train.device`` change floating-point reassociation only (zero-shot and retrieval score every
#: sample on its own); ``train.grad_checkpointing`` recomputes the same forward (RNG state
#: restored); ``train.compile`` runs the same forward through compiled kernels (reassociation only);
#: ``train.accum_inputs`` reads the same micro-batches a second time or keeps them (the same step);
#: ``train.report_to`` sends the logged records to trackers (TensorBoard, W&B) besides ``metrics.jsonl``;
#: ``eval.throughput`` is a timing, not a result. ``data.num_workers`` does not change
#: map-style training data (each sample's augmentation is seeded by (seed, epoch, index), see
#: ``compress.data.sampling.SeededSamples``); for webdataset shards it changes the sample order
#: (shards are split across workers), a different draw of the same experiment.
NON_IDENTITY_KEYS: dict[str, tuple[str, ...]] = {
    "train": ("progress", "log_every", "checkpoint_every", "device", "grad_checkpointing", "compile",
              "accum_inputs", "report_to"),
    "data": ("num_workers",),
    "eval": ("throughput", "batch_size"),
    "teacher_cache": ("dir", "shard_size"),
}


def canonical(value: Any) -> Any:
    """One form per value: integers as floats (``50`` == ``50.0``), tuples as lists."""
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def file_fingerprint(path: str | os.PathLike[str]) -> str | None:
    """Size and modification time of a local file, or of every file below a folder (names
    included); ``None`` if nothing is there. Cheap for multi-GB checkpoints, and it changes
    when a checkpoint is replaced at the same path."""
    root = Path(path)
    if not root.exists():
        return None
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for f in files:
        stat = f.stat()
        digest.update(f"{f.relative_to(root) if f != root else f.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def data_fingerprint(path: str | os.PathLike[str]) -> str | None:
    """A data set's fingerprint, cheap at any size: a file's size and modification time (a CSV), or a folder's
    entries one level deep (names, sizes, modification times: an image added to or removed from a class folder
    changes that folder's time) without walking the images. An image rewritten in place under the same name is not
    seen, by either. ``None`` if nothing is there."""
    root = Path(path)
    if not root.exists():
        return None
    if root.is_file():
        return file_fingerprint(root)
    digest = hashlib.sha256()
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        stat = entry.stat()
        digest.update(f"{entry.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def model_fingerprints(cfg: RunConfig) -> dict[str, str]:
    """Fingerprints of the local files the teacher (every member of an ensemble) and the students (of every stage)
    are read from (``model`` and ``pretrained`` paths); open_clip names and tags have none."""
    out: dict[str, str] = {}
    roles = [("teacher", cfg.teacher), ("student", cfg.student)]
    roles += [(f"stages[{i}].student", stage.student) for i, stage in enumerate(cfg.stages)]
    roles += [(f"teachers[{k}]", spec) for k, spec in enumerate(cfg.teachers) if k > 0]  # teachers[0] is teacher
    for role, spec in roles:
        if spec is None:
            continue
        for key in ("model", "pretrained"):
            value = getattr(spec, key)
            if not value:
                continue
            path = value.removeprefix("local-dir:")
            if "@" in path and not Path(path).exists():
                path = path.split("@", 1)[0]
            fingerprint = file_fingerprint(path) if ("/" in path or Path(path).exists()) else None
            if fingerprint is not None:
                out[f"{role}.{key}"] = fingerprint
    return out


def identity_base(cfg: RunConfig) -> dict[str, Any]:
    """The config as a dict without the sections and keys that do not change the result (plug-in specs as
    written; :func:`compress.recipe.identity.identity_dict` resolves them)."""
    data = {k: v for k, v in cfg.to_dict().items() if k not in NON_IDENTITY_SECTIONS}
    for key in ("teachers", "teacher_cache"):  # sections added later: absent, they leave older ids as they were
        if not data[key]:
            del data[key]
    if "teacher_cache" in data and data["teacher_cache"]["mode"] == "online":  # nothing stored: no format
        data["teacher_cache"] = {k: v for k, v in data["teacher_cache"].items() if k not in ("dtype", "outputs")}
    for section, keys in NON_IDENTITY_KEYS.items():
        if section in data:
            data[section] = {k: v for k, v in data[section].items() if k not in keys}
    for stage in data["stages"]:
        stage["train"] = {k: v for k, v in stage["train"].items() if k not in NON_IDENTITY_KEYS["train"]}
    return data


def hash_identity(data: Any, length: int | None = None) -> str:
    """sha256 of the identity dict's canonical JSON (cut to ``length`` hex digits: the run id)."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()
    return digest[:length] if length else digest
