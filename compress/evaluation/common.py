"""Shared helpers of the evaluators: batch unpacking, eval mode, the model's device, CUDA sync."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn


def synchronize(device: str | torch.device) -> None:
    """Wait for queued CUDA work (timings are meaningless without it)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def unpack(batch: Any, second: tuple[str, ...]) -> tuple[Any, Any]:
    """``(images, other)`` from a ``(images, other, ...)`` tuple or a dict batch.

    Dict batches (``compress.data``) hold ``images`` and the first of ``second`` present
    (``labels``, or ``texts`` / ``tokens``)."""
    if isinstance(batch, Mapping):
        for key in second:
            if key in batch:
                return batch["images"], batch[key]
        raise KeyError(f"batch has none of {second}: keys {sorted(batch)}")
    return batch[0], batch[1]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode, restoring its training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's first floating parameter (CPU / fp32 if none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32
