"""The order of the training samples, and each sample's augmentation seeded by its key.

:class:`EpochShuffleSampler` draws each epoch's permutation from ``(seed, epoch)`` and gives each rank its
share; :class:`EpochKeys` names each sample ``(epoch, index)`` and skips a resumed epoch's first indices
unread; :class:`SeededSamples` seeds the augmentation of sample ``(epoch, index)`` by its key, so the
images do not depend on the number of workers and a resumed run can redraw them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, Sampler

from compress.data.robust import torch_seeded
from compress.data.shards import Keyed


class EpochShuffleSampler(Sampler[int]):
    """A random permutation of ``range(n)`` drawn from ``(seed, epoch)``: reproducible and
    different every epoch (``set_epoch``). With ``world`` > 1 ranks, rank ``r`` takes every
    ``world``-th index from position ``r`` of the same permutation (its tail cut to a multiple of
    ``world``, as ``DistributedSampler(drop_last=True)``): step k's per-rank batches of B together
    are exactly the samples of one process's batch k of ``world * B``."""

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world: int = 1) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} of {world} ranks")
        self.n, self.seed, self.epoch, self.rank, self.world = n, seed, 0, rank, world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g)
        return iter(order[self.rank : self.n - self.n % self.world : self.world].tolist())

    def __len__(self) -> int:
        return self.n // self.world


class EpochKeys(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)`` for every index of ``sampler`` (see :class:`SeededSamples`),
    from position ``start`` of the epoch's order on (:meth:`skip`; ``set_epoch`` resets it)."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler, self.epoch, self.start = sampler, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start = epoch, 0
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def skip(self, n: int) -> None:
        """Leave out the first ``n`` indices of the current epoch's order (they are not loaded)."""
        self.start = n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, int(i)) for i in itertools.islice(self.sampler, self.start, None))

    def __len__(self) -> int:
        return max(len(self.sampler) - self.start, 0)  # type: ignore[arg-type]


class SeededSamples(Dataset):
    """A map-style data set whose random augmentation of sample ``index`` in ``epoch`` is drawn
    from a generator seeded with ``(seed, epoch, index)``, not from whichever worker process
    loads it: the training images are the same whatever ``data.num_workers`` is (and a
    resumed run can redraw them). Keys are ``(epoch, index)`` pairs from :class:`EpochKeys`."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Keyed:
        epoch, index = key
        with torch_seeded((self.seed * 1_000_003 + epoch) * 1_000_000_007 + index):
            return Keyed((epoch, index), self.dataset[index])
