"""Shared helpers of the evaluators: autocast policy, batch unpacking, model input shapes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

PRECISIONS = ("fp32", "bf16", "fp16", "auto")


def autocast(device: str | torch.device, precision: str = "fp32") -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``bf16`` / ``fp16`` on CUDA; a no-op (fp32) elsewhere or for ``fp32``.

    ``auto``: bf16 where the GPU supports it, else fp16; fp32 on CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


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


def image_size_of(model: nn.Module, image_size: int | tuple[int, int] | None = None) -> tuple[int, int]:
    """``(H, W)``: the given size, else ``model.visual.image_size``, else the config's ``vision_cfg``."""
    size: Any = image_size
    if size is None:
        size = getattr(getattr(model, "visual", None), "image_size", None)
    if size is None:
        size = (getattr(model, "clip_cfg", None) or {}).get("vision_cfg", {}).get("image_size")
    if size is None:
        raise ValueError("cannot infer the image size of the model; pass image_size")
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def context_length_of(model: nn.Module, context_length: int | None = None) -> int:
    """The given length, else ``clip_cfg["text_cfg"]["context_length"]``, else ``model.context_length``."""
    if context_length is not None:
        return int(context_length)
    cfg = (getattr(model, "clip_cfg", None) or {}).get("text_cfg", {})
    length = cfg.get("context_length", getattr(model, "context_length", None))
    if length is None:
        raise ValueError("cannot infer the text context length of the model; pass context_length")
    return int(length)


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's first floating parameter (CPU / fp32 if none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def to_device(x: Any, device: torch.device) -> Any:
    return x.to(device, non_blocking=True) if isinstance(x, Tensor) else x
