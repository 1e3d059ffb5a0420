"""The loaders the trainer and evaluator iterate.

:class:`CountedLoader` wraps a ``DataLoader``: it feeds each batch's bad-sample numbers to
a :class:`BadSampleCounter` in the main process (raising ``DataError`` past the limit),
keeps training batches at their full size,
and :meth:`CountedLoader.forever` yields batches without end for step-based training,
calling ``set_epoch`` on the sampler / iterable data set before each pass so every epoch
is reshuffled deterministically from the seed. :meth:`CountedLoader.state_dict` /
:meth:`CountedLoader.load_state_dict` save and restore the stream's position for exact resume.
The data sets come from :mod:`compress.data.datasets`, the training order and the seeding of each
sample's augmentation from :mod:`compress.data.sampling`.
"""

from __future__ import annotations

import copy
import logging
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from compress.config import DataConfig
from compress.data.collate import Batch, KeyedCollate, Tokenizer, make_collate
from compress.data.datasets import build_dataset, dataset_name
from compress.data.robust import BadSampleCounter, DataError
from compress.data.sampling import EpochKeys, EpochShuffleSampler, SeededSamples
from compress.data.shards import ShardDataset
from compress.data.views import FixedViews, FixedViewSamples
from compress.stopping import ignore_in_worker

log = logging.getLogger(__name__)

SamplerArg = Sampler | Callable[[Dataset], Sampler] | None


#: bookkeeping entries of a collated batch, removed before the batch is yielded (a training batch keeps
#: ``"keys"``, its samples' keys: what the gradient cache's second reading checks, see ``read``)
_COUNT_KEYS = ("num_bad", "num_samples")


def _length(batch: Batch) -> int:
    return len(batch["images"])


def _slice(batch: Batch, start: int, stop: int) -> Batch:
    return {k: v[start:stop] if isinstance(v, torch.Tensor | list) else v for k, v in batch.items()}


def _concat(parts: list[Batch]) -> Batch:
    """One batch of the samples of ``parts`` in order (tensors concatenated, lists joined)."""
    out: Batch = {}
    for key, value in parts[0].items():
        if isinstance(value, torch.Tensor):
            out[key] = torch.cat([p[key] for p in parts])
        elif isinstance(value, list):
            out[key] = [x for p in parts for x in p[key]]
        else:  # None (no tokenizer) or a bookkeeping number
            out[key] = value
    return out


class CountedLoader:
    """Iterates a ``DataLoader``, counting bad samples; ``forever()`` for step-based loops.

    With ``batch_size`` (training), every batch has exactly that many samples: a batch that
    lost bad samples is topped up from a reserve filled with the next batches of the stream
    (the next samples of the epoch's order, for map-style and webdataset data alike), so it
    can be split into equal micro-batches and every rank steps on equally many samples.
    Without it (evaluation), batches come as collated and the pass is judged at its end
    (:meth:`BadSampleCounter.close`). Bad-sample bookkeeping lives in ``counter``.

    The position of ``forever()`` is ``epoch``, ``batches_in_epoch`` (DataLoader batches drawn
    in this epoch, bad and refill ones included), ``good_in_epoch``, the reserve and the
    counter: :meth:`state_dict` saves it, :meth:`load_state_dict` restores it. The reserve (fewer
    than ``batch_size`` decoded samples) is saved as the samples' keys (``(epoch, index)``, or
    ``(epoch, shard, position, byte offset)`` for shards) and re-read on load, so a checkpoint's
    size does not depend on how many bad samples were met.
    """

    def __init__(
        self,
        loader: DataLoader,
        counter: BadSampleCounter,
        sampler: Any = None,
        steps_per_epoch: int | None = None,
        batch_size: int | None = None,
    ) -> None:
        self.loader, self.counter, self.sampler = loader, counter, sampler
        self.steps_per_epoch = steps_per_epoch
        self.batch_size = batch_size
        self.epoch = 0
        self.batches_in_epoch = 0
        self.good_in_epoch = 0
        self._reserve: deque[Batch] = deque()
        self._resume = False  # a loaded position that the next forever() continues from
        self._prepared: Iterator[Batch] | None = None  # the DataLoader's iterator at that position, started early
        self._streaming = False  # a forever() stream has started

    @property
    def dataset(self) -> Dataset:
        return self.loader.dataset

    def __len__(self) -> int:
        if self.steps_per_epoch is None:
            raise TypeError("this loader has no known length (set num_samples for webdataset)")
        return self.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for obj in (self.sampler, self.loader.dataset):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)

    def _seek(self) -> Iterator[Batch]:
        """The DataLoader's batches from batch ``batches_in_epoch`` of the current epoch on:
        sampler indices (map-style) or shard samples (webdataset) before it are skipped
        unread; any other source is read and its first batches dropped uncounted."""
        done = self.batches_in_epoch
        if isinstance(self.sampler, EpochKeys):
            self.sampler.skip(done * self._loader_batch_size())
            return iter(self.loader)
        if isinstance(self.dataset, ShardDataset):
            self.dataset.seek(done, self._loader_batch_size())
            return iter(self.loader)
        batches = iter(self.loader)
        for _ in range(done):
            next(batches)
        return batches

    def _loader_batch_size(self) -> int:
        if self.loader.batch_size is None:
            raise DataError("cannot resume a loader without a batch size (a custom batch_sampler)")
        return self.loader.batch_size

    def prepare(self) -> None:
        """Start reading at the loaded position now (:meth:`load_state_dict` first): with workers, they seek
        to it while the caller does other work; the next ``forever()`` continues from there."""
        if self._resume and self._prepared is None:
            self.set_epoch(self.epoch)
            self._prepared = self._seek()

    @property
    def seeks_exactly(self) -> bool:
        """Whether a loaded position is always found again: map-style sets (sampler indices) and shards read
        by at most one worker; with more, ``ShardDataset.seek`` misses it after a worker ran out."""
        return not isinstance(self.dataset, IterableDataset) or self.loader.num_workers <= 1

    def source_dataset(self) -> Dataset:
        """The data set this loader reads, for a second loader over the same samples (``build_train_loader``'s
        ``dataset``): the wrapped map-style set itself (nothing is read or listed again), or a copy of a
        webdataset's (its epoch and seek position are per loader)."""
        ds = self.loader.dataset
        return ds.dataset if isinstance(ds, SeededSamples) else copy.copy(ds)

    def _counted(self, resume: bool = False) -> Iterator[Batch]:
        """The DataLoader's non-empty batches, each counted (raises ``DataError`` past the limit);
        ``resume`` continues the current epoch at the loaded position."""
        if resume:
            batches, self._prepared = (self._prepared, None) if self._prepared is not None else (self._seek(), None)
        else:
            self.good_in_epoch = self.batches_in_epoch = 0
            batches = iter(self.loader)
        for batch in batches:
            self.batches_in_epoch += 1
            self.counter.update_from_batch(batch)
            if batch["images"] is not None:  # a small all-bad batch the counter tolerated
                self.good_in_epoch += _length(batch)
                yield batch

    def _reserved(self) -> int:
        return sum(_length(b) for b in self._reserve)

    def _take(self, k: int) -> list[Batch]:
        parts = []
        while k:
            head = self._reserve[0]
            n = _length(head)
            if n <= k:
                parts.append(self._reserve.popleft())
                k -= n
            else:
                parts.append(_slice(head, 0, k))
                self._reserve[0] = _slice(head, k, n)
                k = 0
        return parts

    def __iter__(self) -> Iterator[Batch]:
        """One pass; raises ``DataError`` past ``max_bad_fraction`` or on an all-bad batch."""
        return self._pass()

    def _pass(self, resume: bool = False) -> Iterator[Batch]:
        batches = self._counted(resume)
        if self.batch_size is None:
            yield from batches
            self.counter.close()
            return
        for batch in batches:
            missing = self.batch_size - _length(batch)
            if missing > 0:
                while self._reserved() < missing:
                    extra = next(batches, None)
                    if extra is None:
                        break
                    self._reserve.append(extra)
                if self._reserved() < missing:  # end of the epoch: keep the samples for the next one
                    self._reserve.append(batch)
                    return
                batch = self._pinned(_concat([batch, *self._take(missing)]))  # a new, pageable concatenation
            yield self._without_counts(batch)

    def _without_counts(self, batch: Batch) -> Batch:
        return {k: v for k, v in batch.items() if k not in _COUNT_KEYS}

    def _pinned(self, batch: Batch) -> Batch:
        """A batch made outside the DataLoader (concatenated, read again), pinned as the loader pins its own."""
        if not self.loader.pin_memory:
            return batch
        return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def read(self, keys: list[list[int]]) -> Batch:
        """The training batch of the samples named by ``keys`` (a yielded batch's ``"keys"``), read and
        decoded again in this process: the same tensors (each sample's augmentation is seeded by its key),
        pinned as the loader pins. Raises ``DataError`` if a sample can no longer be read."""
        batch = self._reread([tuple(int(x) for x in k) for k in keys])
        if batch is None or _length(batch) != len(keys):
            raise DataError(
                f"data set {self.counter.name!r}: {len(keys) - (0 if batch is None else _length(batch))} of "
                f"{len(keys)} samples read before could not be read again (first key {keys[0]})"
            )
        return self._without_counts(self._pinned(batch))

    def forever(self, start_epoch: int = 0) -> Iterator[Batch]:
        """Batches without end, epoch after epoch, each reshuffled (``set_epoch``).

        The generator reads the loader's position at its first ``next()``: a state loaded with
        :meth:`load_state_dict` before then (even after this call) is continued from, and
        ``start_epoch`` is then ignored."""
        self._streaming = True
        resume, self._resume = self._resume, False
        epoch = self.epoch if resume else start_epoch
        while True:
            if not (resume and self._prepared is not None):  # prepare() set the epoch and started reading
                self.set_epoch(epoch)
            yield from self._pass(resume)
            resume = False
            if not self.good_in_epoch:
                raise DataError(
                    f"data set {self.counter.name!r}: an epoch produced no good sample "
                    f"({self.counter.bad} of {self.counter.seen} samples bad so far)"
                )
            epoch += 1

    def state_dict(self) -> dict[str, Any]:
        """The stream's position between two batches of ``forever()``: epoch, DataLoader batches
        drawn and good samples in it, the reserve's sample keys (a list of int lists, not images)
        and the counter. Only numbers, strings, lists, dicts and ``None``: it loads with
        ``torch.load(..., weights_only=True)``."""
        if any("keys" not in b for b in self._reserve):
            raise DataError("cannot save the loader's position: its data set does not name its samples (keys)")
        return {
            "version": _STATE_VERSION,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "good_in_epoch": self.good_in_epoch,
            "batch_size": self.batch_size,
            "num_workers": self.loader.num_workers,
            "reserve": [list(k) for b in self._reserve for k in b["keys"]],
            "counter": self.counter.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the next ``forever()`` stream (or one created but not
        started yet) continues exactly where the saved one was."""
        if self._streaming:
            raise RuntimeError("load_state_dict must come before the first batch of forever()")
        if state.get("version") != _STATE_VERSION:
            raise DataError(
                f"data loader state version {state.get('version')!r}; this code reads {_STATE_VERSION} (the checkpoint "
                "was written by another clip-compress version: start the run fresh with --force)"
            )
        if state["batch_size"] != self.batch_size:
            raise DataError(f"data loader state has batch size {state['batch_size']}, this loader {self.batch_size}")
        saved_workers = state.get("num_workers", self.loader.num_workers)
        if isinstance(self.loader.dataset, IterableDataset) and saved_workers != self.loader.num_workers:
            # shards are split across workers: another count reads other samples from the saved position
            raise DataError(
                f"the checkpoint read its webdataset shards with data.num_workers = {saved_workers}, this run has "
                f"{self.loader.num_workers}: resume with data.num_workers={saved_workers} (or start fresh with --force)"
            )
        self.counter.load_state_dict(state["counter"])
        self.epoch, self.batches_in_epoch = int(state["epoch"]), int(state["batches_in_epoch"])
        self.good_in_epoch = int(state["good_in_epoch"])
        reserve = self._reread([tuple(int(x) for x in k) for k in state["reserve"]])
        self._reserve = deque([reserve] if reserve is not None else [])
        self._resume = True

    def _reread(self, keys: list[tuple[int, ...]]) -> Batch | None:
        """The reserve batch of the samples named by ``keys``, decoded again (each sample's
        augmentation is seeded by its key: the same tensors as before the checkpoint); ``None``
        if there are none (or none could be read again, which is warned)."""
        if not keys:
            return None
        ds = self.loader.dataset
        if isinstance(ds, SeededSamples):
            items = [ds[key] for key in keys]
        elif isinstance(ds, ShardDataset):
            items = ds.read(keys)
        else:
            raise DataError(f"cannot re-read the reserve of a {type(ds).__name__} (its samples have no keys)")
        batch = self.loader.collate_fn(items)  # type: ignore[misc]
        return batch if batch.get("images") is not None else None


#: 2: the reserve holds sample keys (1 held decoded batches)
_STATE_VERSION = 2


def _resolve_sampler(sampler: SamplerArg, dataset: Dataset, seed: int) -> Sampler:
    if sampler is None:
        return EpochShuffleSampler(len(dataset), seed)
    if isinstance(sampler, Sampler):
        return sampler
    return sampler(dataset)


def build_train_loader(
    cfg: DataConfig,
    transform: Any,
    tokenizer: Tokenizer | None,
    batch_size: int,
    seed: int = 0,
    sampler: SamplerArg = None,
    pin_memory: bool | None = None,
    dataset: Dataset | None = None,
    extra_tokenizers: Mapping[str, Tokenizer] | None = None,
) -> CountedLoader:
    """The training loader over ``cfg.train``: shuffled per epoch, ``drop_last=True``, every
    batch exactly ``batch_size`` samples (bad ones replaced by the next good ones). ``dataset``: the
    data set ``cfg.train`` describes, already built (:meth:`CountedLoader.source_dataset`).
    ``extra_tokenizers``: more token ids of the captions, by batch key (:func:`~compress.data.collate.make_collate`).

    ``sampler``: ``None`` (our :class:`EpochShuffleSampler`), a ``Sampler``, or a factory
    ``dataset -> Sampler`` (the training pipeline passes this rank's share of the
    permutation, ``EpochShuffleSampler(n, seed, rank, world)``). Webdataset shards are split
    across ranks by the data set itself (a sampler is ignored there).
    """
    fixed = transform if isinstance(transform, FixedViews) else None
    if dataset is None:  # training always shuffles; fixed views are made from the data set's own images
        dataset = build_dataset(cfg.train, None if fixed else transform, split=cfg.train.split, shuffle=True)
    ds = dataset
    name = dataset_name(cfg.train)
    workers = cfg.num_workers
    common: dict[str, Any] = dict(
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=KeyedCollate(make_collate(tokenizer, extra_tokenizers)),
        drop_last=True,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=ignore_in_worker,  # the main process alone acts on SIGTERM/SIGUSR2 (compress.stopping)
    )
    if isinstance(ds, IterableDataset):
        if sampler is not None:  # shards are already split across ranks by the data set
            log.info("data set %s is iterable: the sampler is not used (shards split per rank)", name)
        if isinstance(ds, ShardDataset):
            ds.with_keys = True
        loader = DataLoader(ds, **common)
        n = cfg.train.num_samples
        steps = n // batch_size if n else None
        chosen = None
    else:
        if len(ds) < batch_size:
            raise DataError(f"data set {name!r} has {len(ds)} samples, fewer than the batch size {batch_size}")
        chosen = EpochKeys(_resolve_sampler(sampler, ds, seed))
        samples = FixedViewSamples(ds, fixed, seed) if fixed is not None else SeededSamples(ds, seed)
        loader = DataLoader(samples, sampler=chosen, persistent_workers=workers > 0, **common)
        steps = len(loader)
    counter = BadSampleCounter(name, cfg.train.max_bad_fraction, cfg.train.bad_window)
    return CountedLoader(loader, counter, chosen, steps, batch_size=batch_size)


def build_eval_loader(
    dataset: Dataset,
    batch_size: int,
    collate_fn: Callable[[list[Any]], Batch],
    num_workers: int = 0,
    name: str = "eval",
    max_bad_fraction: float = 0.01,
    bad_window: int = 1000,
) -> CountedLoader:
    """An in-order loader (no shuffle, last partial batch kept) for evaluation sets."""
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_fn,
        worker_init_fn=ignore_in_worker,
    )
    steps = len(loader) if not isinstance(dataset, IterableDataset) else None
    return CountedLoader(loader, BadSampleCounter(name, max_bad_fraction, bad_window), None, steps)
