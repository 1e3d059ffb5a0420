"""Generating a teacher-output cache (MobileCLIP's reinforced data: the teachers' outputs for ``A`` fixed
augmentations of each training sample, written once, read by every run of a sweep), and checking it.

:func:`generate` writes the shards of one part (``s % parts == part``) first, each under a non-blocking lock
(one another process holds is skipped); with ``wait`` it then takes every missing shard nobody holds, and
finally waits for the lock of each shard still missing (a dead generator's shard is taken over; the kernel
releases its lock). A finished shard is never redone, a killed one's temporary folder is discarded. So the runs
of a sweep started together, or the tasks of a SLURM array, generate a cache once between them (without flock:
:mod:`compress.teacher_cache.locking` says what holds). Once a manifest exists, its ``shard_size`` cuts the
shards (a config's other ``shard_size`` is noted on stderr and ignored: it is not part of the cache id).
:func:`verify` (:mod:`compress.teacher_cache.verify`, re-exported here) recomputes random (sample, view) pairs
online and reports the largest difference per output.
"""

from __future__ import annotations

import json
import os
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
    shard_range,
)
from compress.teacher_cache.locking import STALE_S, ShardLock
from compress.teacher_cache.samples import ViewSamples, check_cacheable, collate_views, teacher_views, train_samples
from compress.teacher_cache.store import (
    MANIFEST,
    STORED_DTYPES,
    CacheStore,
    ShardWriter,
    discard_partial,
    lock_name,
    output_file,
    partial_folders,
    shard_name,
    to_stored,
)
from compress.teacher_cache.teachers import Teachers
from compress.teacher_cache.verify import TOLERANCES, VerifyReport, verify

__all__ = ["TOLERANCES", "CacheConfigError", "GenerateReport", "VerifyReport", "generate", "print_report", "verify"]

#: images per teacher forward: ``max(1, GENERATE_BATCH // num_augmentations)`` samples of ``A`` views each
#: (1024 fp32 224-px views are 0.6 GB on the host, per batch in flight)
GENERATE_BATCH = 1024
#: seconds between progress lines at most
PROGRESS_INTERVAL_S = 10.0
#: without flock: seconds between looks at a shard another generator is writing, and between notes on stderr
POLL_S, WAIT_NOTE_S = 5.0, 60.0
#: seconds between touches of a shard's temporary folder while it is computed (its mtime says it is alive)
HEARTBEAT_S = 60.0


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
    """Write the missing shards of ``cfg``'s cache (see the module docstring); returns what was done.
    ``batch_size`` counts images: each teacher forward takes ``max(1, batch_size // num_augmentations)`` samples."""
    check_cacheable(cfg)
    if not 0 <= part < parts:
        raise CacheConfigError(f"cache part {part} is not in [0, {parts})")
    started = time.monotonic()
    root = cache_root(cfg)
    store = CacheStore(root)
    if store.complete():  # the completion marker: the data set is not even read, no shard folder listed
        return _finish(GenerateReport(root, store.num_samples, store.num_shards), store, started)
    root.mkdir(parents=True, exist_ok=True)
    dataset = train_samples(cfg)
    writer = _ShardGenerator(cfg, root, dataset, batch_size)
    writer.write_manifest()
    total = writer.num_shards
    report = GenerateReport(root, writer.num_samples, total)
    done = sum(writer.shard_len(s) for s in store.written_shards())
    bar = _Progress(writer.num_samples, done, progress)
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
        summary = store.mark_complete()  # the summary and the completion marker (read, if there)
        report.bad_samples, report.bytes = summary["bad_samples"], summary["bytes"]
    report.seconds = time.monotonic() - started
    return report


def _create_once(path: Path, text: str) -> None:
    """``path`` with ``text`` unless it exists (atomic: a hard link of a complete file; ``False`` races lose)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    atomic_write_text(tmp, text)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    except OSError:  # no hard links here: a rename (the last of racing writers wins, read back by all)
        if not path.exists():
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
        self.shard_size = int(self.tc.shard_size)  # the manifest's, once read (write_manifest)
        self.num_shards = num_shards(self.num_samples, self.shard_size)
        self._teachers: Teachers | None = None

    @property
    def teachers(self) -> Teachers:
        if self._teachers is None:
            self._teachers = Teachers.load(self.cfg, self.tc.outputs)
        return self._teachers

    def rows(self, shard: int) -> range:
        return shard_range(shard, self.shard_size, self.num_samples)

    def shard_len(self, shard: int) -> int:
        return len(self.rows(shard))

    @property
    def samples_per_batch(self) -> int:
        """``batch_size`` counts images: ``max(1, batch_size // num_augmentations)`` samples of A views."""
        return max(1, self.batch_size // self.tc.num_augmentations)

    def done(self, shard: int) -> bool:
        return (self.root / shard_name(shard)).is_dir()

    def write_manifest(self) -> None:
        """The manifest, written once (by whichever generator comes first), then read back: its ``shard_size`` and
        ``num_shards`` cut the shards (a config's other ``shard_size`` is noted on stderr)."""
        path = self.root / MANIFEST
        if not path.is_file():
            t = self.teachers
            manifest = {"format": FORMAT_VERSION, "cache_id": cache_id_of(self.cfg),
                        "identity": cache_identity(self.cfg), "num_samples": self.num_samples,
                        "shard_size": self.shard_size, "num_shards": self.num_shards,
                        "num_augmentations": self.tc.num_augmentations, "dtype": self.tc.dtype,
                        "outputs": list(self.tc.outputs), "precision": t.precision.name,
                        "teachers": t.manifest_entries(self.cfg), "summary": None}
            _create_once(path, json.dumps(manifest, indent=1) + "\n")
        self._adopt(json.loads(path.read_text()))

    def _adopt(self, manifest: dict[str, Any]) -> None:
        """Check an existing manifest against this config and take its cut of the shards."""
        if manifest.get("cache_id") != self.root.name:
            raise CacheConfigError(f"teacher cache {self.root}: its manifest is of cache {manifest.get('cache_id')}"
                                   f", not {self.root.name}: remove the folder")
        here = run_device(self.cfg)[1].name
        if manifest["precision"] != here:  # train.precision auto resolves per machine
            raise CacheConfigError(
                f"teacher cache {self.root} was generated with the teachers in {manifest['precision']}, but "
                f"train.precision {self.cfg.train.precision!r} is {here} here: set train.precision: "
                f"{manifest['precision']} (or generate it where it resolves so)")
        if int(manifest["num_samples"]) != self.num_samples:
            raise CacheConfigError(f"teacher cache {self.root}: its manifest holds {manifest['num_samples']} samples, "
                                   f"the training data {self.num_samples}: remove the folder")
        size = int(manifest["shard_size"])
        if size != self.tc.shard_size:
            print(f"clip-compress: note: teacher cache {self.root} is cut in shards of {size} samples (its manifest); "
                  f"teacher_cache.shard_size {self.tc.shard_size} is ignored for it", file=sys.stderr)
        self.shard_size, self.num_shards = size, int(manifest["num_shards"])

    def try_shard(self, shard: int, blocking: bool) -> str:
        """``computed``, ``done`` (another process finished it) or ``held`` (locked elsewhere, not waited for)."""
        lock = ShardLock(self.root / lock_name(shard), blocking)
        with lock as held:
            if not held:
                return "held"
            if self.done(shard):
                return "done"
            if lock.supported:
                discard_partial(self.root, shard)  # we hold the lock: any temporary folder is a killed writer's
            else:
                if not self._wait_unlocked(shard, blocking):
                    return "held"
                if self.done(shard):
                    return "done"
                discard_partial(self.root, shard, older_than_s=STALE_S)  # a live writer's folder is younger
            self.write_shard(shard)
            lock.remove()
        return "computed"

    def _wait_unlocked(self, shard: int, blocking: bool) -> bool:
        """Without flock: whether to compute ``shard`` now. A temporary folder younger than ``STALE_S`` is a
        live writer's: ``False`` (skip) when not ``blocking``, else poll until it is committed or goes stale."""
        last_note = 0.0
        while not self.done(shard):
            live = [(path, age) for path, age in partial_folders(self.root, shard) if age < STALE_S]
            if not live:
                return True
            if not blocking:
                return False
            if time.monotonic() - last_note >= WAIT_NOTE_S:
                last_note = time.monotonic()
                print(f"clip-compress: waiting for shard {shard} of {self.root}: {live[0][0].name} was written "
                      f"{live[0][1]:.0f} s ago (no file locks here; taken over {STALE_S:.0f} s after its last "
                      "change)", file=sys.stderr)
            time.sleep(POLL_S)
        return True

    def batches(self, shard: int) -> Iterator[dict[str, Any]]:
        """The shard's samples in batches of :attr:`samples_per_batch` (each sample's A views)."""
        samples = ViewSamples(self.dataset, teacher_views(self.teachers.preprocess), self.tc.num_augmentations,
                              self.tc.seed)
        workers = self.cfg.data.num_workers
        yield from DataLoader(Subset(samples, self.rows(shard)), batch_size=self.samples_per_batch, shuffle=False,
                              num_workers=workers, collate_fn=collate_views,
                              pin_memory=self.teachers.device.type == "cuda", persistent_workers=False)

    def write_shard(self, shard: int) -> None:
        """Compute and write one shard: its temporary folder is made first (without flock, the claim other
        generators see; touched every :data:`HEARTBEAT_S`) and renamed into place at the end."""
        started = time.monotonic()
        n = self.shard_len(shard)
        writer = ShardWriter(self.root, shard)
        try:
            ok, boxes, arrays = self._compute(shard, writer)
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

    def _compute(self, shard: int, writer: ShardWriter) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """``ok``, ``boxes`` and every output file's rows of one shard (a bad sample's rows stay zero)."""
        n, views, dtype = self.shard_len(shard), self.tc.num_augmentations, self.tc.dtype
        teachers = self.teachers
        ok = np.zeros(n, dtype=bool)
        boxes = np.zeros((n, views, 4), dtype=np.int32)
        arrays: dict[str, np.ndarray] = {}
        for k, model in enumerate(teachers.models):
            dim = embed_dim(model)
            for name in self.tc.outputs:
                shape = (n, views, dim) if name.startswith("image_") else (n, dim)
                arrays[output_file(name, k)] = np.zeros(shape, dtype=STORED_DTYPES[dtype])
        first, beat = self.rows(shard).start, time.monotonic()
        for batch in self.batches(shard):
            if time.monotonic() - beat >= HEARTBEAT_S:
                beat = time.monotonic()
                os.utime(writer.tmp)  # alive (what a generator without flock looks at)
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
        return ok, boxes, arrays


def print_report(report: GenerateReport, stream: Any = None) -> None:
    """The CLI's summary of a generation."""
    stream = sys.stdout if stream is None else stream
    state = "complete" if report.complete else f"{len(report.missing)} of {report.num_shards} shards missing"
    print(f"teacher cache {report.root} ({state})", file=stream)
    size = f"{report.bytes / 2**30:.2f} GiB" if report.bytes >= 2**30 else f"{report.bytes / 2**20:.2f} MiB"
    bad = "?" if report.bad_samples is None else report.bad_samples
    print(f"  size {size}, samples {report.num_samples}, bad samples {bad}, shards computed here "
          f"{len(report.computed)}, time {report.seconds:.1f} s", file=stream)
