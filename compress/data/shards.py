"""webdataset shards: tar files holding ``<key>.jpg|png|webp`` + ``<key>.txt`` per sample.

The path is a brace pattern (``shards/{000000..000009}.tar``, ``::`` joins patterns; any
URL ``webdataset.gopen`` opens, ``pipe:`` included). Tar reading is ours (:func:`shard_samples`,
Python's ``tarfile`` in stream mode, grouped into samples by key as ``webdataset`` does), and so is
decoding: a corrupt image or a sample without an image or caption yields ``None`` (skipped and
counted by the collate function) instead of webdataset's ``warn_and_continue`` (which warns,
sleeps and counts nothing).

A truncated or damaged shard is detected, not read as a shorter one: ``tarfile`` (and so
``webdataset``) ends the member list silently at a broken header after the first member, so a
shard cut at a third used to lose its last two thirds with nothing counted. A shard is intact
only if its members end with an end-of-archive (zero) block; otherwise the samples it could not
deliver are counted as bad (a :class:`~compress.data.robust.Lost` marker): the shard's expected
count from the stats its writer left beside it (img2dataset's ``{shard}_stats.json``
``"successes"``, or a ``sizes.json`` mapping shard file name -> count) minus the samples read;
without stats, for a local uncompressed shard, an estimate from its size (:func:`_estimate_lost`:
the bytes after the point where reading stopped over the mean bytes per sample read, at least 1:
it sees a shard damaged in the middle, not a cut-off tail, which leaves no bytes behind); else 1
("at least 1"). The shard is named in the log once per process. The check costs no extra read:
the end-of-archive block is the last header ``tarfile`` reads anyway; the stats file is read, or
the shard's size taken (one ``stat``), only for a broken shard.

Shards are shuffled per epoch (``set_epoch``), split across distributed ranks and then
across DataLoader workers; samples pass through a shuffle buffer in training. Each sample's
random augmentation is seeded by (seed, epoch, shard, position in the shard), so a resumed epoch
(:meth:`ShardDataset.seek`) redraws the same images, and a sample named by its key
``(epoch, shard, position, byte offset)`` is re-read on its own (:meth:`ShardDataset.read`: a seek
into an uncompressed local shard). Options: ``shuffle_buffer`` (1000 when shuffling, 0 disables),
``image_exts``, ``text_exts``.
"""

from __future__ import annotations

import functools
import json
import random
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlparse

import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls

from compress import distributed
from compress.data.robust import DataError, Lost, apply_transform, open_image, torch_seeded, warn_bad

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("txt", "text", "caption")

#: webdataset's split of a member name into sample key and extension(s), and its metadata names
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META = re.compile(r"__[^/]*__($|/)")
#: how tarfile's header errors read in the log
_ENDINGS = {
    "empty header": "it ends without the end-of-archive blocks (cut at a member boundary)",
    "truncated header": "it ends inside a header (cut short)",
    "bad checksum": "a damaged header (overwritten or corrupted data)",
    "invalid header": "a damaged header (overwritten or corrupted data)",
}


class Keyed(NamedTuple):
    """A training item with the key that re-reads it: ``(epoch, index)`` for map-style data,
    ``(epoch, shard, position, byte offset)`` for shards; ``item`` is ``None`` for a bad sample."""

    key: tuple[int, ...]
    item: Any


class _WatchedHeader(tarfile.TarInfo):
    """A ``TarInfo`` that notes on its ``TarFile`` how reading the last header went (``ending``):
    ``"end"`` for an end-of-archive block, else tarfile's reason. ``tarfile`` ends the member list
    at any broken header after the first member as if the archive had ended there."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            info = super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.ending = "end"  # type: ignore[attr-defined]
            raise
        except tarfile.HeaderError as e:
            tar.ending = str(e) or type(e).__name__  # type: ignore[attr-defined]
            raise
        tar.ending = None  # type: ignore[attr-defined]
        return info


def _local_path(url: str) -> Path | None:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(parsed.path)
    return Path(url) if parsed.scheme == "" and url != "-" else None


@functools.lru_cache(maxsize=4096)
def expected_samples(url: str) -> tuple[int, str] | None:
    """The sample count a shard's writer recorded beside it, and where: img2dataset's
    ``{name}_stats.json`` (``"successes"``) or a ``sizes.json`` mapping shard file name -> count;
    ``None`` if neither exists or the shard is not a local file (read once per process)."""
    path = _local_path(url)
    if path is None:
        return None
    stem = path.name.split(".tar")[0] if ".tar" in path.name else path.stem
    try:
        stats = path.with_name(f"{stem}_stats.json")
        if stats.is_file():
            return int(json.loads(stats.read_text())["successes"]), stats.name
        sizes = path.with_name("sizes.json")
        if sizes.is_file():
            count = json.loads(sizes.read_text()).get(path.name)
            if count is not None:
                return int(count), sizes.name
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # unreadable or another layout
        return None
    return None


def _estimate_lost(url: str, stop: int, read: int) -> tuple[int, str] | None:
    """Samples lost after byte ``stop`` (where reading stopped: a broken header) of a local uncompressed
    shard of which ``read`` samples were read, from its size ``S`` (one ``stat``): the unread data over
    the mean bytes per sample read, ``round((S - stop - tail) / (stop / read))``, at least 1. ``tail`` is
    what an intact tar has after its data: the two zero end blocks (1 KiB) and, if ``S`` is a whole number
    of tar records (10 KiB, what ``tarfile``, GNU tar and webdataset's writer pad to), half a record, the
    mean padding. With the log's explanation; ``None`` if there is no size or no sample to measure by."""
    path = _local_path(url)
    if path is None or read <= 0 or stop <= 0:
        return None
    try:
        size = path.stat().st_size
    except OSError:
        return None
    record = tarfile.RECORDSIZE
    tail = 2 * tarfile.BLOCKSIZE + (record // 2 if size % record == 0 else 0)
    per_sample = stop / read
    lost = round(max(size - stop - tail, 0) / per_sample)
    if lost < 1:
        return 1, (f"at least 1: reading stopped at byte {stop} of {size}, so the shard was cut short and its "
                   "size cannot tell how many samples were cut off")
    return lost, f"estimated: {size - stop} bytes unread after byte {stop}, {per_sample:.0f} bytes per sample read"


def _members(tar: tarfile.TarFile) -> Iterator[tuple[str, str, int, bytes]]:
    """(sample key, extension, header offset, payload) of each regular member, metadata skipped."""
    for info in tar:
        tar.members = []  # tarfile keeps every header otherwise
        match = _KEY_EXT.match(info.name) if info.isreg() else None
        if match is None or _META.match(info.name):
            continue
        data = tar.extractfile(info).read()  # type: ignore[union-attr]
        yield match.group(1), match.group(2).lower(), info.offset, data


def _open_tar(url: str, offset: int = 0) -> tuple[Any, tarfile.TarFile]:
    stream = wds.gopen(url)
    try:
        if offset:
            stream.seek(offset)
        return stream, tarfile.open(fileobj=stream, mode="r|" if offset else "r|*", tarinfo=_WatchedHeader)
    except BaseException:
        stream.close()
        raise


def shard_samples(url: str, shard: int) -> Iterator[dict[str, Any] | Lost]:
    """The samples of one shard in order (``{"__key__", "__url__", "__shard__", "__pos__",
    "__offset__", ext: bytes...}``; ``__offset__`` is the byte offset of the sample's first header,
    -1 in a compressed shard), then, if the shard is truncated, damaged or unreadable, one
    :class:`Lost` for the samples it could not deliver (see the module docstring)."""
    read, current, problem = 0, None, None
    stream, tar, plain = None, None, False
    try:
        stream, tar = _open_tar(url)
        plain = getattr(tar.fileobj, "comptype", "tar") == "tar"
        for key, ext, offset, data in _members(tar):
            if current is None or key != current["__key__"] or ext in current:
                if current is not None:
                    yield current
                    read += 1
                current = {"__key__": key, "__url__": url, "__shard__": shard, "__pos__": read,
                           "__offset__": offset if plain else -1}
            current[ext] = data
        if getattr(tar, "ending", None) != "end":
            ending = getattr(tar, "ending", None)
            problem = _ENDINGS.get(ending, ending or "it ends early")
    except Exception as e:  # unreadable, not a tar, data cut inside a member
        problem = f"{type(e).__name__}: {e}"
    finally:
        if stream is not None:
            stream.close()
    if current is not None:  # its members were read whole; decoding judges whether it is complete
        yield current
        read += 1
    if problem is not None:
        expected = expected_samples(url)
        if expected is not None:
            lost, known = max(expected[0] - read, 0), f"{expected[0]} expected per {expected[1]}"
        else:
            estimate = _estimate_lost(url, tar.offset, read) if tar is not None and plain else None
            lost, known = estimate or (1, "count unknown: at least 1")
        warn_bad(url, f"truncated or damaged shard: {problem}; {read} sample(s) read, {lost} lost ({known})",
                 once=True)
        if lost:
            yield Lost(lost)


def _sample_at(url: str, offset: int) -> dict[str, Any] | None:
    """The members of the sample whose first header is at ``offset`` of an uncompressed shard."""
    stream, tar = _open_tar(url, offset)
    sample: dict[str, Any] | None = None
    try:
        for key, ext, _, data in _members(tar):
            if sample is not None and (key != sample["__key__"] or ext in sample):
                break
            sample = sample or {"__key__": key, "__url__": url}
            sample[ext] = data
    except Exception as e:
        warn_bad(f"{url}@{offset}", e)
    finally:
        stream.close()
    return sample


def _buffer_shuffle(items: Iterator[Any], bufsize: int, rng: random.Random) -> Iterator[Any]:
    """webdataset's shuffle buffer of ``bufsize`` items. A :class:`Lost` marker passes at once: it
    then comes a buffer's length before the worker's last item, out of the partial last batch that
    ``drop_last`` drops uncounted."""
    buf: list[Any] = []
    for item in items:
        if isinstance(item, Lost):
            yield item
            continue
        buf.append(item)
        if len(buf) >= bufsize:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


class ShardDataset(IterableDataset):
    """An iterable of (image, caption) or ``None`` over webdataset tar shards (a :class:`Lost`
    for the samples a broken shard could not deliver; :class:`Keyed` items when ``with_keys``)."""

    def __init__(
        self,
        urls: str | list[str],
        transform: Any = None,
        shuffle: bool = False,
        seed: int = 0,
        num_samples: int | None = None,
        shuffle_buffer: int | None = None,
        image_exts: tuple[str, ...] | list[str] = IMAGE_EXTS,
        text_exts: tuple[str, ...] | list[str] = TEXT_EXTS,
    ) -> None:
        self.urls = expand_urls(urls) if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise DataError(f"webdataset: no shards in {urls!r}")
        self.transform, self.shuffle, self.seed = transform, shuffle, seed
        self.num_samples = num_samples
        self.shuffle_buffer = (1000 if shuffle else 0) if shuffle_buffer is None else shuffle_buffer
        self.image_exts, self.text_exts = tuple(image_exts), tuple(text_exts)
        self.epoch = 0
        self.skip_batches, self.batch_size = 0, 0
        self.with_keys = False  # training sets this: items come as Keyed(key, item) for the loader's reserve
        # read here, in the process that builds the loader: a DataLoader worker may not see the group
        self.rank, self.world = distributed.rank(), distributed.world_size()
        if len(self.urls) < self.world:
            raise DataError(
                f"webdataset: {len(self.urls)} shard(s) cannot be split across {self.world} processes (each reads "
                "its own shards): write more shards or start fewer processes"
            )

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle shards and samples for this epoch (workers see it at the next ``iter``);
        the epoch starts at its beginning."""
        self.epoch = epoch
        self.skip_batches = 0

    def seek(self, batches: int, batch_size: int) -> None:
        """Start the current epoch after the first ``batches`` DataLoader batches of ``batch_size``.

        The DataLoader takes batches round-robin from workers 0..W-1, so logical worker ``w``
        had made ``batches // W + (w < batches % W)`` of them: each worker skips that many
        batches of its shuffled stream without decoding, and worker ids are rotated by
        ``batches % W`` so the round-robin continues with the right worker. Exact with 0 or 1
        workers, and with W workers as long as no worker ran out of samples earlier in the
        epoch (after that the DataLoader's order is no longer a plain round-robin).
        """
        self.skip_batches, self.batch_size = batches, batch_size

    def _worker(self) -> tuple[int, int]:
        """(logical worker id, number of workers): DataLoader worker ids rotated by :meth:`seek`."""
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        return (wid + self.skip_batches) % nworkers, nworkers

    def _shard_ids(self) -> list[int]:
        """Indices (into ``urls``) of this worker's shards in this epoch's order."""
        ids = list(range(len(self.urls)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(ids)
        wid, nworkers = self._worker()
        return ids[self.rank :: self.world][wid::nworkers]

    def _sample_seed(self, epoch: int, shard: int, position: int) -> int:
        """The augmentation seed of sample ``position`` of shard ``shard`` in ``epoch``."""
        return ((self.seed * 1_000_003 + epoch) * 1_000_003 + shard) * 1_000_000_007 + position

    def _decode(self, sample: dict[str, Any], seed: int) -> tuple[Any, str] | None:
        name = f"{sample.get('__url__')}:{sample.get('__key__')}"
        image_bytes = next((sample[e] for e in self.image_exts if e in sample), None)
        text_bytes = next((sample[e] for e in self.text_exts if e in sample), None)
        if image_bytes is None or text_bytes is None:
            warn_bad(name, f"no image or caption among {sorted(k for k in sample if not k.startswith('__'))}")
            return None
        try:
            text = text_bytes.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            warn_bad(name, e)
            return None
        img = open_image(image_bytes, name)
        if img is None or not text:
            return None
        with torch_seeded(seed):
            out = apply_transform(self.transform, img, name)
        return None if out is None else (out, text)

    def _item(self, sample: dict[str, Any], epoch: int) -> Any:
        """A raw sample decoded (``None`` if bad), as a :class:`Keyed` item when ``with_keys``."""
        shard, position = sample["__shard__"], sample["__pos__"]
        item = self._decode(sample, self._sample_seed(epoch, shard, position))
        return Keyed((epoch, shard, position, sample["__offset__"]), item) if self.with_keys else item

    def read(self, keys: list[tuple[int, ...]]) -> list[Keyed]:
        """The samples named by ``keys`` (``(epoch, shard, position, byte offset)``, see :class:`Keyed`),
        decoded as they were in their epoch: a seek per sample into an uncompressed local shard, else
        one read of each shard up to the last position wanted. A sample no longer there is ``None``."""
        found: dict[tuple[int, int], dict[str, Any] | None] = {}
        scan: dict[int, set[int]] = {}
        for _, shard, position, offset in keys:
            url = self.urls[shard]
            if offset >= 0 and _local_path(url) is not None:
                found[shard, position] = _sample_at(url, offset)
            else:
                scan.setdefault(shard, set()).add(position)
        for shard, positions in scan.items():
            for sample in shard_samples(self.urls[shard], shard):
                if isinstance(sample, dict) and sample["__pos__"] in positions:
                    found[shard, sample["__pos__"]] = sample
                    positions.discard(sample["__pos__"])
                    if not positions:
                        break
        out = []
        for key in keys:
            epoch, shard, position, _ = key
            sample = found.get((shard, position))
            if sample is None:
                warn_bad(f"{self.urls[shard]}#{position}", "a reserved sample could not be read again")
            item = None if sample is None else self._decode(sample, self._sample_seed(epoch, shard, position))
            out.append(Keyed(tuple(key), item))
        return out

    def __iter__(self) -> Iterator[Any]:
        wid, nworkers = self._worker()
        key = (self.seed * 1_000_003 + self.epoch) * 1009 + wid + 7919 * self.rank
        stream: Iterator[Any] = (s for i in self._shard_ids() for s in shard_samples(self.urls[i], i))
        if self.shuffle and self.shuffle_buffer > 1:
            stream = _buffer_shuffle(stream, self.shuffle_buffer, random.Random(key))
        skip = (self.skip_batches // nworkers + (wid < self.skip_batches % nworkers)) * self.batch_size
        epoch = self.epoch
        for position, sample in enumerate(stream):
            if position >= skip:  # the skipped ones are read (to keep the order), not decoded
                yield sample if isinstance(sample, Lost) else self._item(sample, epoch)
