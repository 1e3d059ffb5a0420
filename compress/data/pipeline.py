"""What a run needs from the data package: an endless stream of training batches and counts."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compress import distributed
from compress.config import RunConfig
from compress.data.loader import CountedLoader, EpochShuffleSampler, build_train_loader
from compress.data.transforms import train_transform_for
from compress.models.forward import tokenizer_for


@dataclass
class DataStats:
    """Counts of the training stream (bad samples skipped), for the log and the result row."""

    loader: CountedLoader

    def as_metrics(self, all_ranks: bool = False) -> dict[str, Any]:
        """This process's counts, or (``all_ranks``, a collective) the sums over every process's share."""
        counter = self.loader.counter
        seen, bad = counter.seen, counter.bad
        if all_ranks and distributed.world_size() > 1:
            seen, bad = distributed.sum_over_ranks(torch.tensor([seen, bad], dtype=torch.int64)).tolist()
        return {"data/samples_seen": seen, "data/bad_samples": bad,
                "data/bad_fraction": round(bad / seen, 6) if seen else 0.0}


def _sampler_for_ranks(seed: int):
    """This rank's share of each epoch's permutation under torch.distributed, else the default sampler."""
    if not distributed.is_distributed():
        return None
    rank, world = distributed.rank(), distributed.world_size()
    return lambda ds: EpochShuffleSampler(len(ds), seed, rank, world)


def train_batches(
    cfg: RunConfig, student: nn.Module, teacher: nn.Module | None, device: torch.device
) -> tuple[Iterator[dict[str, Any]], DataStats]:
    """Micro-batches ``{"images", "texts", "captions"}`` forever (a new shuffle each epoch), each
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
    before drawing the first batch."""
    train_tf = train_transform_for(student, teacher)
    micro = cfg.train.micro_batch(distributed.world_size())
    loader = build_train_loader(
        cfg.data, train_tf, tokenizer_for(student), micro, seed=cfg.seed, sampler=_sampler_for_ranks(cfg.seed),
        pin_memory=device.type == "cuda",
    )
    return loader.forever(), DataStats(loader)
