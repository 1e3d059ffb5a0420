"""What a step draws, made repeatable: the generator of its gate sample (the same on every rank and
after a resume), the random state a live pass replays from its features pass (Gao et al. 2021's
RandContext), and BatchNorm statistics the features pass leaves alone (the live pass counts them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn


def gate_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of step ``step``'s gate sample on ``device`` (the trainer's: on CUDA the noise is
    drawn there, no host copy): seeded from (seed, step), so the same on every rank and after a resume."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) % 2**63)


@contextlib.contextmanager
def frozen_batch_norm_statistics(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers in training mode normalise with the batch's statistics, as the live pass does,
    but leave ``running_mean``, ``running_var`` and ``num_batches_tracked`` alone: the gradient cache's
    features pass must not count a micro-batch that its live pass counts again."""
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False  # in training mode: batch statistics, no running update
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def random_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The torch random state a forward on ``device`` draws from (CPU, and the CUDA device's)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextlib.contextmanager
def replayed_random_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> Iterator[None]:
    """Run the block from ``state`` (:func:`random_state`), so a live pass draws what its features pass
    drew (Gao et al.'s RandContext); the random state after the block is the one before it."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield
