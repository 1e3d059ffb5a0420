"""webdataset shards: tar files holding ``<key>.jpg|png|webp`` + ``<key>.txt`` per sample.

The path is a brace pattern (``shards/{000000..000009}.tar``, ``::`` joins patterns; any
URL ``webdataset.gopen`` opens, ``pipe:`` included). Tar reading uses the ``webdataset``
package (``tarfile_samples``); decoding is ours, so a corrupt image, a sample without an
image or caption, or an unreadable/truncated shard yields ``None`` (skipped and counted by
the collate function) instead of webdataset's ``warn_and_continue`` (which warns, sleeps
and counts nothing).

Shards are shuffled per epoch (``set_epoch``), split across distributed ranks and then
across DataLoader workers; samples pass through a shuffle buffer in training. Each sample's
random augmentation is seeded by (seed, epoch, rank, worker, position in the worker's stream),
so a resumed epoch (:meth:`ShardDataset.seek`) redraws the same images. Options:
``shuffle_buffer`` (1000 when shuffling, 0 disables), ``image_exts``, ``text_exts``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls

from compress import distributed
from compress.data.robust import DataError, apply_transform, open_image, torch_seeded, warn_bad

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("txt", "text", "caption")


def _buffer_shuffle(items: Iterator[Any], bufsize: int, rng: random.Random) -> Iterator[Any]:
    buf: list[Any] = []
    for item in items:
        buf.append(item)
        if len(buf) >= bufsize:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


class ShardDataset(IterableDataset):
    """An iterable of (image, caption) or ``None`` over webdataset tar shards."""

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

    def shards_for_this_worker(self) -> list[str]:
        urls = list(self.urls)
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(urls)
        wid, nworkers = self._worker()
        return urls[self.rank :: self.world][wid::nworkers]

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

    def _raw(self, urls: list[str]) -> Iterator[dict[str, Any] | None]:
        errors: list[BaseException] = []

        def handler(exn: BaseException) -> bool:
            errors.append(exn)
            return True  # continue with the next member / shard

        for sample in wds.tarfile_samples(({"url": u} for u in urls), handler=handler):
            while errors:
                warn_bad("webdataset", errors.pop())
                yield None
            yield sample
        while errors:
            warn_bad("webdataset", errors.pop())
            yield None

    def __iter__(self) -> Iterator[tuple[Any, str] | None]:
        wid, nworkers = self._worker()
        key = (self.seed * 1_000_003 + self.epoch) * 1009 + wid + 7919 * self.rank
        stream: Iterator[Any] = self._raw(self.shards_for_this_worker())
        if self.shuffle and self.shuffle_buffer > 1:
            stream = _buffer_shuffle(stream, self.shuffle_buffer, random.Random(key))
        skip = (self.skip_batches // nworkers + (wid < self.skip_batches % nworkers)) * self.batch_size
        for position, sample in enumerate(stream):
            if position >= skip:  # the skipped ones are read (to keep the order), not decoded
                yield None if sample is None else self._decode(sample, key * 1_000_000_007 + position)
