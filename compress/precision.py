"""Device and mixed-precision policy: bf16/fp16 autocast on CUDA, fp32 on CPU (one policy for
training and evaluation), and moving batches to the device."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class DeviceError(ValueError):
    """A device this machine does not have (or a name that is no device)."""


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA if there is one, else the CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps``: a device this machine has,
    else :class:`DeviceError` (:func:`available_device`)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"{name!r} is not a device (auto, cpu, cuda, cuda:N or mps)") from None
    return available_device(device)


def available_device(device: torch.device) -> torch.device:
    """``device`` if this machine has it (the one device rule of validation, dry run and run): the CPU; ``mps``
    where ``torch.backends.mps.is_available()``; CUDA available, and ``cuda:N`` with N below the visible count."""
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"{str(device)!r} requested but this machine has no MPS (Apple GPU) device: use cpu or auto")
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        raise DeviceError(f"{str(device)!r} requested but this machine has no CUDA device (torch {torch.__version__}, "
                          f"CUDA_VISIBLE_DEVICES={visible}): use cpu or auto")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceError(f"{str(device)!r} requested but this machine has {count} CUDA device(s) "
                          f"(cuda:0{f'..cuda:{count - 1}' if count > 1 else ''})")
    return device


@dataclass(frozen=True)
class Precision:
    """``fp32`` | ``bf16`` | ``fp16`` (the last with a gradient scaler)."""

    name: str
    device: torch.device

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device.type) if self.name == "fp16" else None


def resolve_precision(name: str, device: torch.device | str) -> Precision:
    """``auto``: bf16 on a CUDA device that supports it, else fp16 on CUDA, fp32 on CPU."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}")
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            name = "fp32"
    if name in ("bf16", "fp16") and device.type != "cuda":
        raise ValueError(f"precision {name!r} needs a CUDA device; use fp32 (or auto) on {device.type}")
    return Precision(name, device)


def to_device(x: Any, device: torch.device | str) -> Any:
    """A tensor moved to ``device`` (non-blocking), a mapping (a batch) with its tensors moved,
    anything else unchanged."""
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, Mapping):
        return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in x.items()}
    return x


def run_device(cfg: Any) -> tuple[torch.device, Precision]:
    """The device this process trains on (``train.device``; ``cuda`` is ``cuda:LOCAL_RANK`` in a run of several
    processes) and the precision there (``train.precision``), refused with a :class:`ConfigError` naming the key
    when this machine does not have them. The run asks before anything is written; its dry run asks too."""
    from compress import distributed
    from compress.config.errors import ConfigError

    try:
        device = available_device(distributed.local_device(resolve_device(cfg.train.device)))
    except DeviceError as error:
        raise ConfigError(f"train.device: {error}") from None
    try:
        return device, resolve_precision(cfg.train.precision, device)
    except ValueError as error:
        raise ConfigError(f"train.precision: {error}") from None
