"""What a run needs from the data package: an endless stream of training batches and counts."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compress import distributed
from compress.config import RunConfig
from compress.data.loader import CountedLoader, EpochShuffleSampler, build_train_loader
from compress.data.robust import DataError
from compress.data.transforms import train_transform_for
from compress.models.forward import tokenizer_for


class ReplayStream:
    """The gradient cache's second reading of a step's micro-batches (``train.accum_inputs: reread``).

    A second loader over the same data, order and per-sample seeds, started (:meth:`begin_step`) from the
    position the first loader has when a step begins, yields the step's micro-batches again one pass
    later: the trainer keeps none of the step's images (host memory: this loader's batches in flight, not
    ``accum_steps`` micro-batches); the cost is a second decode of every sample (and ``data.num_workers``
    more worker processes). Each micro-batch is checked against the keys the first pass read; one that
    differs (a sample that read differently the second time, e.g. a flaky file system) is read again by
    key in this process (:meth:`CountedLoader.read`), and the second loader restarts from the first's
    position at the next step (counted in ``resyncs``)."""

    def __init__(self, build: Callable[[], CountedLoader], main: CountedLoader) -> None:
        self.build, self.main = build, main
        self._stream: Iterator[dict[str, Any]] | None = None
        self.resyncs = 0

    def begin_step(self) -> None:
        """Before the step's first micro-batch is drawn from the first loader: (re)start the second one at
        that position if it is not running in step (the first step, or after a mismatch)."""
        if self._stream is None:
            loader = self.build()
            loader.load_state_dict(self.main.state_dict())
            self._stream = loader.forever()

    def again(self, keys: list[list[int]] | None) -> dict[str, Any]:
        """The next micro-batch of the step a second time; ``keys``: the samples the first pass read."""
        if self._stream is not None:
            batch = next(self._stream)
            if keys is None or batch.get("keys") == keys:
                return batch
            self._stream = None  # out of step: its workers go with it; restarted at the next step
            self.resyncs += 1
            print(f"clip-compress: warning: the second reading of a micro-batch gave other samples than the first "
                  f"(first key {keys[0]} vs {batch.get('keys', [None])[0]}); reading them again by key and restarting "
                  f"the second loader at the next step", file=sys.stderr)
        if keys is None:
            raise DataError("the second loader stopped and the micro-batch has no sample keys to read it again by")
        return self.main.read(keys)


@dataclass
class DataStats:
    """Counts of the training stream (bad samples skipped), for the log and the result row; ``replay``:
    the second reading of the micro-batches (``train.accum_inputs: reread`` with ``accum_steps`` > 1)."""

    loader: CountedLoader
    replay: ReplayStream | None = None

    def as_metrics(self, all_ranks: bool = False) -> dict[str, Any]:
        """This process's counts, or (``all_ranks``, a collective) the sums over every process's share."""
        counter = self.loader.counter
        counts = [counter.seen, counter.bad] + ([self.replay.resyncs] if self.replay is not None else [])
        if all_ranks and distributed.world_size() > 1:
            counts = distributed.sum_over_ranks(torch.tensor(counts, dtype=torch.int64)).tolist()
        seen, bad = counts[:2]
        out = {"data/samples_seen": seen, "data/bad_samples": bad,
               "data/bad_fraction": round(bad / seen, 6) if seen else 0.0}
        if self.replay is not None:
            out["data/replay_resyncs"] = counts[2]
        return out


def _sampler_for_ranks(seed: int):
    """This rank's share of each epoch's permutation under torch.distributed, else the default sampler."""
    if not distributed.is_distributed():
        return None
    rank, world = distributed.rank(), distributed.world_size()
    return lambda ds: EpochShuffleSampler(len(ds), seed, rank, world)


def train_batches(
    cfg: RunConfig, student: nn.Module, teacher: nn.Module | None, device: torch.device
) -> tuple[Iterator[dict[str, Any]], DataStats]:
    """Micro-batches ``{"images", "texts", "captions", "keys"}`` forever (a new shuffle each epoch), each
    with exactly ``train.batch_size / (world size x train.accum_steps)`` samples (bad ones
    replaced): the trainer draws ``accum_steps`` of them per optimizer step, so the loader's
    batches in flight, and the position it saves, are counted in micro-batches.

    Images are preprocessed for the student (its size and normalisation); when the teacher
    needs another size or normalisation, ``"teacher_images"`` holds the same random view
    prepared for the teacher (see :class:`~compress.data.transforms.DistillTransform`). Pass
    ``teacher=None`` when no loss reads the teacher. ``device`` is where the batches will go
    (pinned memory on CUDA).

    The stream is a generator that reads the loader's position at its first ``next()``: to
    resume, call ``stats.loader.load_state_dict(state)`` (a saved ``stats.loader.state_dict()``)
    before drawing the first batch. With ``train.accum_steps`` > 1 and ``train.accum_inputs: reread``,
    ``stats.replay`` reads each step's micro-batches a second time (:class:`ReplayStream`)."""
    train_tf = train_transform_for(student, teacher)
    micro = cfg.train.micro_batch(distributed.world_size())

    def build() -> CountedLoader:
        return build_train_loader(
            cfg.data, train_tf, tokenizer_for(student), micro, seed=cfg.seed, sampler=_sampler_for_ranks(cfg.seed),
            pin_memory=device.type == "cuda",
        )

    loader = build()
    replay = ReplayStream(build, loader) if cfg.train.accum_steps > 1 and cfg.train.accum_inputs == "reread" else None
    return loader.forever(), DataStats(loader, replay)
