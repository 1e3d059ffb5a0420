"""Generating a teacher-output cache (MobileCLIP's reinforced data: the teachers' outputs for ``A`` fixed
augmentations of each training sample, written once, read by every run of a sweep), and checking it.

:func:`generate` writes the shards of one part (``s % parts == part``) first, each under a non-blocking lock
(one another process holds is skipped); with ``wait`` it then takes every missing shard nobody holds, and
finally waits for the lock of each shard still missing (a dead generator's shard is taken over; the kernel
releases its lock). A finished shard is never redone, a killed one's temporary folder is discarded. So the runs
of a sweep started together, or the tasks of a SLURM array, generate a cache once between them.
:func:`verify` (:mod:`compress.teacher_cache.verify`, re-exported here) recomputes random (sample, view) pairs
online and reports the largest difference per output.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset, Subset

from compress.config import RunConfig
from compress.fileio import atomic_write_text
from compress.models.forward import embed_dim
from compress.precision import run_device
from compress.progress import LineProgress
from compress.teacher_cache.identity import (
    FORMAT_VERSION,
    CacheConfigError,
    cache_id_of,
    cache_identity,
    cache_root,
    num_shards,
)
from compress.teacher_cache.locking import ShardLock
from compress.teacher_cache.samples import ViewSamples, check_cacheable, collate_views, teacher_views, train_samples
from compress.teacher_cache.store import (
    MANIFEST,
    STORED_DTYPES,
    CacheStore,
    ShardWriter,
    discard_partial,
    lock_name,
    output_file,
    shard_name,
    to_stored,
)
from compress.teacher_cache.teachers import Teachers
from compress.teacher_cache.verify import TOLERANCES, VerifyReport, verify

__all__ = ["TOLERANCES", "CacheConfigError", "GenerateReport", "VerifyReport", "generate", "print_report", "verify"]

#: samples per teacher forward (each with ``num_augmentations`` views)
GENERATE_BATCH = 256
#: seconds between progress lines at most
PROGRESS_INTERVAL_S = 10.0


@dataclass
class GenerateReport:
    """What one :func:`generate` call did: the shards it ``computed``, those it ``skipped`` (held by another
    process, not waited for), those still ``missing``, and the cache's totals once complete."""

    root: Path
    num_samples: int
    num_shards: int
    computed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    bad_samples: int | None = None
    bytes: int = 0
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return not self.missing


def generate(cfg: RunConfig, part: int = 0, parts: int = 1, wait: bool = True, progress: bool = True,
             batch_size: int = GENERATE_BATCH) -> GenerateReport:
    """Write the missing shards of ``cfg``'s cache (see the module docstring); returns what was done."""
    check_cacheable(cfg)
    if not 0 <= part < parts:
        raise CacheConfigError(f"cache part {part} is not in [0, {parts})")
    started = time.monotonic()
    root = cache_root(cfg)
    store = CacheStore(root)
    if (root / MANIFEST).is_file() and not store.missing_shards():  # complete: the data set is not even read
        return _finish(GenerateReport(root, store.num_samples, int(store.manifest["num_shards"])), store, started)
    root.mkdir(parents=True, exist_ok=True)
    dataset = train_samples(cfg)
    tc = cfg.teacher_cache
    assert tc is not None
    total = num_shards(len(dataset), tc.shard_size)  # type: ignore[arg-type]
    report = GenerateReport(root, len(dataset), total)  # type: ignore[arg-type]
    writer = _ShardGenerator(cfg, root, dataset, batch_size)
    writer.write_manifest()
    done = sum(writer.shard_len(s) for s in range(total) if writer.done(s))
    bar = _Progress(len(dataset), done, progress)  # type: ignore[arg-type]
    own = [s for s in range(total) if s % parts == part]
    passes = [(own, False)] + ([(range(total), False), (range(total), True)] if wait else [])
    for shards, blocking in passes:
        for shard in shards:
            if writer.done(shard):
                continue
            state = writer.try_shard(shard, blocking)
            if state == "computed":
                report.computed.append(shard)
                bar.update(writer.shard_len(shard))
    report.skipped = sorted({s for s in own if not writer.done(s)})
    bar.close()
    return _finish(report, store, started)


def _finish(report: GenerateReport, store: CacheStore, started: float) -> GenerateReport:
    report.missing = store.missing_shards()
    if not report.missing:
        summary = write_summary(store)
        report.bad_samples, report.bytes = summary["bad_samples"], summary["bytes"]
    report.seconds = time.monotonic() - started
    return report


def write_summary(store: CacheStore) -> dict[str, Any]:
    """The complete cache's totals (samples, bad samples, bytes, generation seconds) in its manifest."""
    store.reload()
    manifest = store.manifest
    if manifest.get("summary"):
        return manifest["summary"]
    metas = [store.shard_meta(s) for s in range(int(manifest["num_shards"]))]
    size = sum(p.stat().st_size for s in range(int(manifest["num_shards"]))
               for p in (store.root / shard_name(s)).iterdir())
    summary = {"samples": int(manifest["num_samples"]), "bad_samples": sum(int(m["bad"]) for m in metas),
               "bytes": size, "seconds": round(sum(float(m["seconds"]) for m in metas), 3)}
    atomic_write_text(store.root / MANIFEST, json.dumps({**manifest, "summary": summary}, indent=1) + "\n")
    store.reload()
    return summary


class _Progress:
    """Samples done, rate and ETA on stderr, a line every :data:`PROGRESS_INTERVAL_S` seconds at most."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        self.bar = LineProgress(total, "cache-teacher", lines=1, interval_s=PROGRESS_INTERVAL_S) if enabled else None
        self.started, self.before = time.monotonic(), done
        if self.bar is not None:
            self.bar.n = self.bar.last_n = done  # what was there before this process: not part of its rate

    def update(self, n: int) -> None:
        if self.bar is None:
            return
        rate = (self.bar.n + n - self.before) / max(time.monotonic() - self.started, 1e-9)
        left = (self.bar.total - self.bar.n - n) / rate if rate > 0 else float("inf")
        self.bar.set_postfix(samples_per_s=f"{rate:.1f}", eta=_duration(left))
        self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    h, rest = divmod(int(seconds), 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


class _ShardGenerator:
    """Writes shards of one cache: its teachers loaded on first need, one DataLoader per shard."""

    def __init__(self, cfg: RunConfig, root: Path, dataset: Dataset, batch_size: int) -> None:
        assert cfg.teacher_cache is not None
        self.cfg, self.tc, self.root, self.dataset = cfg, cfg.teacher_cache, root, dataset
        self.batch_size = int(batch_size)
        self.num_samples = len(dataset)  # type: ignore[arg-type]
        self._teachers: Teachers | None = None

    @property
    def teachers(self) -> Teachers:
        if self._teachers is None:
            self._teachers = Teachers.load(self.cfg, self.tc.outputs)
        return self._teachers

    def shard_len(self, shard: int) -> int:
        start = shard * self.tc.shard_size
        return max(min(start + self.tc.shard_size, self.num_samples) - start, 0)

    def done(self, shard: int) -> bool:
        return (self.root / shard_name(shard)).is_dir()

    def write_manifest(self) -> None:
        """The manifest, written once (by whichever generator comes first; the same content from any)."""
        path = self.root / MANIFEST
        if path.is_file():
            manifest = json.loads(path.read_text())
            if manifest.get("cache_id") != self.root.name:
                raise CacheConfigError(f"teacher cache {self.root}: its manifest is of cache {manifest.get('cache_id')}"
                                       f", not {self.root.name}: remove the folder")
            here = run_device(self.cfg)[1].name
            if manifest["precision"] != here:  # train.precision auto resolves per machine
                raise CacheConfigError(
                    f"teacher cache {self.root} was generated with the teachers in {manifest['precision']}, but "
                    f"train.precision {self.cfg.train.precision!r} is {here} here: set train.precision: "
                    f"{manifest['precision']} (or generate it where it resolves so)")
            return
        t = self.teachers
        manifest = {"format": FORMAT_VERSION, "cache_id": cache_id_of(self.cfg), "identity": cache_identity(self.cfg),
                    "num_samples": self.num_samples, "shard_size": self.tc.shard_size,
                    "num_shards": num_shards(self.num_samples, self.tc.shard_size),
                    "num_augmentations": self.tc.num_augmentations, "dtype": self.tc.dtype,
                    "outputs": list(self.tc.outputs), "precision": t.precision.name,
                    "teachers": t.manifest_entries(self.cfg), "summary": None}
        atomic_write_text(path, json.dumps(manifest, indent=1) + "\n")

    def try_shard(self, shard: int, blocking: bool) -> str:
        """``computed``, ``done`` (another process finished it) or ``held`` (locked elsewhere, not waited for)."""
        lock = ShardLock(self.root / lock_name(shard), blocking)
        with lock as held:
            if not held:
                return "held"
            if self.done(shard):
                return "done"
            discard_partial(self.root, shard)
            self.write_shard(shard)
            lock.remove()
        return "computed"

    def batches(self, shard: int) -> Iterator[dict[str, Any]]:
        start = shard * self.tc.shard_size
        samples = ViewSamples(self.dataset, teacher_views(self.teachers.preprocess), self.tc.num_augmentations,
                              self.tc.seed)
        subset = Subset(samples, range(start, start + self.shard_len(shard)))
        workers = self.cfg.data.num_workers
        yield from DataLoader(subset, batch_size=self.batch_size, shuffle=False, num_workers=workers,
                              collate_fn=collate_views, pin_memory=self.teachers.device.type == "cuda",
                              persistent_workers=False)

    def write_shard(self, shard: int) -> None:
        """Compute and write one shard (its temporary folder renamed into place)."""
        started = time.monotonic()
        n, views, dtype = self.shard_len(shard), self.tc.num_augmentations, self.tc.dtype
        teachers = self.teachers
        stored = STORED_DTYPES[dtype]
        ok = np.zeros(n, dtype=bool)
        boxes = np.zeros((n, views, 4), dtype=np.int32)
        arrays: dict[str, np.ndarray] = {}
        for k, model in enumerate(teachers.models):
            dim = embed_dim(model)
            for name in self.tc.outputs:
                shape = (n, views, dim) if name.startswith("image_") else (n, dim)
                arrays[output_file(name, k)] = np.zeros(shape, dtype=stored)
        first = shard * self.tc.shard_size
        for batch in self.batches(shard):
            local = (batch["index"] - first).numpy()
            ok[local] = batch["ok"].numpy()
            good = local[batch["ok"].numpy()]
            if good.size == 0:
                continue
            boxes[good] = batch["boxes"].numpy()
            for k in range(len(teachers.models)):
                out = teachers.forward(k, batch["views"][str(k)], batch["captions"])
                for name in self.tc.outputs:
                    values = getattr(out, name)
                    if name.startswith("image_"):
                        values = values.reshape(good.size, views, -1)
                    arrays[output_file(name, k)][good] = to_stored(values, dtype)
        writer = ShardWriter(self.root, shard)
        try:
            writer.write("ok.npy", ok)
            writer.write("boxes.npy", boxes)
            for filename, array in arrays.items():
                writer.write(filename, array)
            writer.write_meta({"shard": shard, "samples": n, "bad": int(n - ok.sum()),
                               "seconds": round(time.monotonic() - started, 3)})
        except BaseException:
            writer.abort()
            raise
        writer.commit()


def print_report(report: GenerateReport, stream: Any = None) -> None:
    """The CLI's summary of a generation."""
    stream = sys.stdout if stream is None else stream
    state = "complete" if report.complete else f"{len(report.missing)} of {report.num_shards} shards missing"
    print(f"teacher cache {report.root} ({state})", file=stream)
    size = f"{report.bytes / 2**30:.2f} GiB" if report.bytes >= 2**30 else f"{report.bytes / 2**20:.2f} MiB"
    bad = "?" if report.bad_samples is None else report.bad_samples
    print(f"  size {size}, samples {report.num_samples}, bad samples {bad}, shards computed here "
          f"{len(report.computed)}, time {report.seconds:.1f} s", file=stream)
