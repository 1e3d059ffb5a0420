"""The teacher-output cache on disk: a manifest and one folder of ``.npy`` files per shard, read memory-mapped.

Layout under the cache's root (``teacher_cache.dir / cache_id``)::

    manifest.json              format, cache_id, identity, num_samples, shard_size, num_shards, num_augmentations,
                               dtype, outputs, precision, teachers [{model, image_dim, text_dim, logit_scale}],
                               summary (null until every shard is there: samples, bad_samples, bytes, seconds)
    complete.json              the summary again, written (atomically) last, once every shard is there: a reader
                               checks it alone instead of listing ~24k shard folders (400M samples / 16384)
    shard-000012/              samples [12 x shard_size, min(13 x shard_size, N)), n of them
        ok.npy                 bool[n]        False: a bad sample (zero rows; skipped in training)
        boxes.npy              int32[n, A, 4] each view's crop box (top, left, height, width)
        image_features-0.npy   [n, A, D]      teacher 0's output for each view (-1, ... for the others;
        image_embeds-0.npy                    image_embeds likewise)
        text_features-0.npy    [n, D]         text outputs do not depend on the view (text_embeds likewise)
        meta.json              samples, bad, seconds
    shard-000012.lock          the generators' lock (flock) while the shard is written

A shard is written to a temporary folder ``.shard-XXXXXX.tmp-HOST-PID-RANDOM`` (one per writer) and renamed
(atomic): a folder named ``shard-XXXXXX`` is complete. ``shard_size`` and ``num_shards`` are the manifest's: a
config's other ``shard_size`` (not part of the cache id) never re-cuts an existing cache.
Numbers are float16, float32, or bfloat16 stored as its uint16 bit pattern (numpy has no bfloat16); the reader
returns float32.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import resource
import shutil
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from compress.fileio import atomic_write_text, fsync_path
from compress.teacher_cache.identity import shard_range

MANIFEST = "manifest.json"
SHARD_META = "meta.json"
#: the completion marker (the summary), written last when every shard is there
COMPLETE = "complete.json"
#: the most shards' memory maps a reader keeps open (an LRU; ~4 maps each: 32k maps stay under Linux's default
#: vm.max_map_count of 65530). Each map also holds an open file descriptor (Python < 3.13 dups the fd into every
#: ``mmap``), so the LRU is sized from RLIMIT_NOFILE too: :func:`open_shards_limit`. A shard mapped again costs
#: ~0.1 ms (4 files), a mapped one only its page reads
OPEN_SHARDS = 8192
#: file descriptors a reading process leaves to everything else (sockets, NCCL, a DataLoader's pipes, logs)
FD_RESERVE = 256
#: the fewest shards kept mapped, whatever the limit
MIN_OPEN_SHARDS = 4
#: maps per shard (ok, boxes, and ~2 outputs read per step)
MAPS_PER_SHARD = 4
#: the numpy dtype each cache dtype is stored as
STORED_DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16}


def open_shards_limit() -> int:
    """Shards a reader may keep mapped in this process: ``(soft RLIMIT_NOFILE - FD_RESERVE) / 4`` (each map holds
    an fd), at least :data:`MIN_OPEN_SHARDS`, at most :data:`OPEN_SHARDS`. With the common soft limit of 1024 that
    is 192 shards per process (each DataLoader worker is one; every shard still readable, re-mapped on need)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return OPEN_SHARDS
    return max(MIN_OPEN_SHARDS, min(OPEN_SHARDS, (int(soft) - FD_RESERVE) // MAPS_PER_SHARD))


class CacheStoreError(RuntimeError):
    """A cache folder that cannot be read as asked (no manifest, a missing shard, an output not stored)."""


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}"


def lock_name(shard: int) -> str:
    return f"{shard_name(shard)}.lock"


def output_file(name: str, teacher: int) -> str:
    """``image_features-0.npy``: output ``name`` of teacher ``teacher``."""
    return f"{name}-{teacher}.npy"


def to_stored(values: Tensor, dtype: str) -> np.ndarray:
    """Float values as the cache stores them: float32, float16, or bfloat16's bits as uint16 (rounded to nearest
    even by torch)."""
    if dtype == "bf16":
        return values.detach().to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    return values.detach().to(torch_dtype).cpu().numpy()


def from_stored(values: np.ndarray) -> np.ndarray:
    """Stored numbers as float32 (uint16: bfloat16 bits, the high half of a float32)."""
    if values.dtype == np.uint16:
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32, copy=False)


class ShardWriter:
    """Writes one shard into a temporary folder next to its final name; :meth:`commit` renames it (atomic).

    Each file is fsynced before the rename and the root after it, so a crash leaves either no shard or a
    complete one; a killed writer's temporary folder is removed by the next generator of that shard
    (:func:`discard_partial`)."""

    def __init__(self, root: Path, shard: int) -> None:
        self.root, self.shard = Path(root), shard
        self.final = self.root / shard_name(shard)
        self.tmp = self.root / (f".{shard_name(shard)}.tmp-{socket.gethostname()}-{os.getpid()}-"
                                f"{uuid.uuid4().hex[:8]}")
        self.tmp.mkdir(parents=True)

    def write(self, filename: str, array: np.ndarray) -> None:
        path = self.tmp / filename
        with open(path, "wb") as f:
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())

    def write_meta(self, meta: dict[str, Any]) -> None:
        atomic_write_text(self.tmp / SHARD_META, json.dumps(meta, sort_keys=True) + "\n")

    def commit(self) -> bool:
        """Rename the folder to its final name; ``False`` (and the folder removed) if another writer was first."""
        fsync_path(self.tmp)
        try:
            os.rename(self.tmp, self.final)
        except OSError:
            if not self.final.is_dir():
                raise
            shutil.rmtree(self.tmp, ignore_errors=True)  # written twice (no flock here): the same content
            return False
        fsync_path(self.root)
        return True

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def partial_folders(root: Path, shard: int) -> list[tuple[Path, float]]:
    """The temporary folders of ``shard`` (live or killed writers') and their age in seconds (by mtime)."""
    now, out = time.time(), []
    for path in Path(root).glob(f".{shard_name(shard)}.tmp-*"):
        try:
            out.append((path, now - path.stat().st_mtime))
        except FileNotFoundError:  # committed or removed meanwhile
            continue
    return out


def discard_partial(root: Path, shard: int, older_than_s: float = 0.0) -> int:
    """Remove the temporary folders of ``shard`` older than ``older_than_s`` (0: all, what killed writers left;
    call it holding the shard's lock, or with a large age where no lock is held: a live writer's folder is young)."""
    stale = [path for path, age in partial_folders(root, shard) if age >= older_than_s]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return len(stale)


def _read_layout(f: Any, path: str, rows: int) -> tuple[np.dtype, tuple[int, ...], int]:
    """An open ``.npy`` file's dtype, row shape and data offset (its header parsed), checked to hold ``rows`` rows."""
    version = np.lib.format.read_magic(f)
    header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = header(f)
    if fortran or shape[0] != rows:
        raise CacheStoreError(f"teacher cache file {path} holds {shape} (Fortran order {fortran}), not {rows} rows")
    return dtype, tuple(shape[1:]), f.tell()


def _as_index(values: Any) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.int64).reshape(-1)


class CacheStore:
    """Reads a cache folder: ``ok``, ``boxes`` and ``outputs`` for sample ids (and view indices).

    Picklable and lazy: the manifest and the shards' memory maps are opened on first use in each process (a
    DataLoader worker opens its own), and at most ``open_shards`` shards' maps are kept (least recently used
    dropped; default :func:`open_shards_limit` of the process, from its file-descriptor limit)."""

    def __init__(self, root: str | Path, open_shards: int | None = None) -> None:
        self.root = Path(root)
        self._open_shards = None if open_shards is None else int(open_shards)
        self._reset()

    def _reset(self) -> None:
        self._manifest: dict[str, Any] | None = None
        self._maps: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()
        self._layouts: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        self._pid = os.getpid()
        self.open_shards = open_shards_limit() if self._open_shards is None else self._open_shards

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "open_shards": self._open_shards}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.root, self._open_shards = state["root"], state["open_shards"]
        self._reset()

    def __repr__(self) -> str:
        return f"CacheStore({str(self.root)!r})"

    # -- the manifest ---------------------------------------------------------------------------
    @property
    def manifest(self) -> dict[str, Any]:
        if self._manifest is None:
            path = self.root / MANIFEST
            if not path.is_file():
                raise CacheStoreError(f"no teacher cache at {self.root} ({MANIFEST} missing): build it with "
                                      "`clip-compress cache-teacher CONFIG`")
            self._manifest = json.loads(path.read_text())
        return self._manifest

    def reload(self) -> None:
        """Read the manifest again (its summary is written when the last shard is done)."""
        self._manifest = None

    @property
    def num_samples(self) -> int:
        return int(self.manifest["num_samples"])

    @property
    def shard_size(self) -> int:
        return int(self.manifest["shard_size"])

    @property
    def num_shards(self) -> int:
        return int(self.manifest["num_shards"])

    def shard_rows(self, shard: int) -> range:
        """The sample ids of ``shard`` (the manifest's cut)."""
        return shard_range(shard, self.shard_size, self.num_samples)

    def marked_complete(self) -> bool:
        """The completion marker is there (one stat; no shard folder listed)."""
        return (self.root / COMPLETE).is_file()

    def written_shards(self) -> list[int]:
        """The shards written (the completion marker, else one listing of the folder)."""
        count = self.num_shards  # the manifest (its clear error first)
        if self.marked_complete():
            return list(range(count))
        names = set(os.listdir(self.root))
        return [s for s in range(count) if shard_name(s) in names]

    def missing_shards(self) -> list[int]:
        """The shards not written yet (the completion marker, else one listing of the folder)."""
        count = self.num_shards  # the manifest (its clear error first)
        if self.marked_complete():
            return []
        names = set(os.listdir(self.root))
        return [s for s in range(count) if shard_name(s) not in names]

    def complete(self) -> bool:
        """A manifest and every shard are there: the completion marker, else the folder listed."""
        if self.marked_complete():
            return True
        return (self.root / MANIFEST).is_file() and not self.missing_shards()

    def mark_complete(self) -> dict[str, Any]:
        """The complete cache's totals (samples, bad samples, bytes, generation seconds), read from every shard
        once, into its manifest's summary and then the completion marker; the marker's summary if it is there."""
        if self.marked_complete():
            return json.loads((self.root / COMPLETE).read_text())
        if self.missing_shards():
            raise CacheStoreError(f"teacher cache {self.root}: shards {self.missing_shards()[:5]} missing")
        self.reload()
        manifest = self.manifest
        summary = manifest.get("summary")
        if not summary:
            metas = [self.shard_meta(s) for s in range(self.num_shards)]
            size = sum(p.stat().st_size for s in range(self.num_shards) for p in (self.root / shard_name(s)).iterdir())
            summary = {"samples": self.num_samples, "bad_samples": sum(int(m["bad"]) for m in metas),
                       "bytes": size, "seconds": round(sum(float(m["seconds"]) for m in metas), 3)}
            atomic_write_text(self.root / MANIFEST, json.dumps({**manifest, "summary": summary}, indent=1) + "\n")
        atomic_write_text(self.root / COMPLETE, json.dumps(summary, sort_keys=True) + "\n")
        self.reload()
        return summary

    def shard_meta(self, shard: int) -> dict[str, Any]:
        return json.loads((self.root / shard_name(shard) / SHARD_META).read_text())

    # -- rows ---------------------------------------------------------------------------------
    def _array(self, shard: int, filename: str) -> np.ndarray:
        if os.getpid() != self._pid:  # a forked process: its own maps
            self._reset()
        key = (shard, filename)
        array = self._maps.get(key)
        if array is not None:
            self._maps.move_to_end(key)
            return array
        path = os.path.join(self.root, shard_name(shard), filename)
        try:
            array = self._map(path, filename, self._shard_rows(shard))
        except FileNotFoundError:
            if not (self.root / shard_name(shard)).is_dir():
                raise CacheStoreError(f"teacher cache {self.root}: shard {shard} is missing (generation unfinished: "
                                      "run `clip-compress cache-teacher CONFIG`)") from None
            raise CacheStoreError(f"teacher cache {self.root}: {filename} is not stored "
                                  "(teacher_cache.outputs)") from None
        self._maps[key] = array
        if len(self._maps) > self.open_shards * MAPS_PER_SHARD:  # each map holds a file descriptor
            self._maps.popitem(last=False)
        return array

    def _shard_rows(self, shard: int) -> int:
        return len(self.shard_rows(shard))

    def _map(self, path: str, filename: str, rows: int) -> np.ndarray:
        """``path`` memory-mapped read-only. Every shard's file of one name has the same header (dtype, row shape,
        offset) but the row count: it is parsed once per name (``np.load`` parses it per file, and opens a shard
        ~4x slower) and a file whose size does not fit it is parsed on its own."""
        layout = self._layouts.get(filename)
        with open(path, "rb") as f:
            if layout is not None:
                dtype, tail, offset = layout
                if os.fstat(f.fileno()).st_size != offset + rows * dtype.itemsize * math.prod(tail):
                    layout = None
            if layout is None:
                layout = _read_layout(f, path, rows)
                self._layouts.setdefault(filename, layout)
            dtype, tail, offset = layout
            if rows == 0:
                return np.zeros((0, *tail), dtype=dtype)
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return np.frombuffer(buffer, dtype=dtype, count=rows * math.prod(tail), offset=offset).reshape(rows, *tail)

    def _gather(self, filename: str, ids: np.ndarray, augs: np.ndarray | None) -> np.ndarray:
        """Rows of ``filename`` for ``ids`` (and views ``augs``), in their order, as stored (one fancy index per
        shard touched: ids grouped by shard with one sort)."""
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_samples):
            raise CacheStoreError(f"teacher cache {self.root}: sample id out of range [0, {self.num_samples})")
        if ids.size == 0:
            array = self._array(0, filename)
            return np.empty((0, *array.shape[1 if augs is None else 2:]), dtype=array.dtype)
        shards, local = np.divmod(ids, self.shard_size)
        if ids.size == 1 or shards.min() == shards.max():  # one shard (a sample read by a loader worker)
            array = self._array(int(shards[0]), filename)
            return array[local] if augs is None else array[local, augs]
        order = np.argsort(shards, kind="stable")
        groups = np.split(order, np.flatnonzero(np.diff(shards[order])) + 1)
        out: np.ndarray | None = None
        for where in groups:
            array = self._array(int(shards[where[0]]), filename)
            rows = array[local[where]] if augs is None else array[local[where], augs[where]]
            if out is None:
                out = np.empty((ids.size, *rows.shape[1:]), dtype=rows.dtype)
            out[where] = rows
        assert out is not None
        return out

    def ok(self, ids: Iterable[int] | Tensor) -> Tensor:
        """``BoolTensor[n]``: whether each sample was read (False: a bad sample, its rows are zeros)."""
        return torch.from_numpy(self._gather("ok.npy", _as_index(ids), None).astype(bool))

    def boxes(self, ids: Iterable[int] | Tensor, augs: Iterable[int] | Tensor) -> Tensor:
        """``LongTensor[n, 4]``: the crop box (top, left, height, width) of view ``augs[j]`` of sample ``ids[j]``."""
        ids_, augs_ = _as_index(ids), self._augs(augs, ids)
        return torch.from_numpy(self._gather("boxes.npy", ids_, augs_).astype(np.int64))

    def outputs(self, name: str, teacher: int, ids: Iterable[int] | Tensor,
                augs: Iterable[int] | Tensor | None = None) -> Tensor:
        """``float32 Tensor[n, D]``: teacher ``teacher``'s output ``name`` for view ``augs[j]`` of sample ``ids[j]``
        (``augs`` is ignored for text outputs)."""
        if name not in self.manifest["outputs"]:
            raise CacheStoreError(f"teacher cache {self.root} does not hold {name!r} (it holds "
                                  f"{self.manifest['outputs']}: teacher_cache.outputs)")
        if not 0 <= teacher < len(self.manifest["teachers"]):
            raise CacheStoreError(f"teacher cache {self.root} holds {len(self.manifest['teachers'])} teacher(s), "
                                  f"not teacher {teacher}")
        ids_ = _as_index(ids)
        augs_ = self._augs(augs, ids) if name.startswith("image_") else None
        rows = self._gather(output_file(name, teacher), ids_, augs_)
        return torch.from_numpy(np.ascontiguousarray(from_stored(rows)))

    def _augs(self, augs: Any, ids: Any) -> np.ndarray:
        if augs is None:
            raise CacheStoreError("image outputs and boxes need the view indices (augs)")
        augs_ = _as_index(augs)
        if augs_.size != _as_index(ids).size:
            raise CacheStoreError(f"{augs_.size} view indices for {_as_index(ids).size} sample ids")
        count = int(self.manifest["num_augmentations"])
        if augs_.size and (augs_.min() < 0 or augs_.max() >= count):
            raise CacheStoreError(f"teacher cache {self.root}: view index out of range [0, {count})")
        return augs_
