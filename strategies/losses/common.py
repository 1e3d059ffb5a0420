"""Shared pieces of the loss plug-ins: temperature handling and the soft-target cross-entropy."""

from __future__ import annotations

import torch
from torch import Tensor

from compress.outputs import ClipOutput

#: the string value of a ``scale`` parameter that selects each model's own ``logit_scale``
MODEL_SCALE = "model"


def check_scale(scale: float | str) -> float | str:
    """Validate a ``scale`` parameter: a positive number (fixed s = 1/tau) or ``"model"``."""
    if isinstance(scale, str):
        if scale != MODEL_SCALE:
            raise ValueError(
                f"scale: expected a positive number (a fixed s = 1/tau, e.g. 50 as in TinyCLIP's "
                f"scripts) or the string {MODEL_SCALE!r} (each model's own logit_scale), got {scale!r}"
            )
        return scale
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not scale > 0:
        raise ValueError(f"scale: expected a positive number or {MODEL_SCALE!r}, got {scale!r}")
    return float(scale)


def check_weights(**weights: float) -> None:
    """Validate per-term weights of a loss: finite numbers >= 0 (a negative weight maximises a loss)."""
    for key, value in weights.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
            raise ValueError(f"{key}: expected a finite number >= 0, got {value!r}")


def scale_of(scale: float | str, output: ClipOutput, *, detach: bool = False) -> Tensor | float:
    """The multiplier s of the logits: the fixed number, or the output's exponentiated logit_scale."""
    if scale != MODEL_SCALE:
        return scale
    s = output.logit_scale
    return s.detach() if detach else s


def scaled_similarity(rows: Tensor, cols: Tensor, scale: Tensor | float) -> Tensor:
    """``s * rows @ cols^T`` in at least float32 (half-precision logits lose the softmax's tail).

    Autocast is switched off around the product: under it the matmul of float32 inputs would run
    (and return) in bf16/fp16 again; float64 inputs stay float64."""
    dtype = torch.promote_types(torch.promote_types(rows.dtype, cols.dtype), torch.float32)
    with torch.autocast(device_type=rows.device.type, enabled=False):
        scale = scale.to(dtype) if isinstance(scale, Tensor) else scale
        return scale * rows.to(dtype) @ cols.to(dtype).T


def soft_cross_entropy(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """CE(p -> q) = -sum_j p_j log q_j averaged over rows, p = softmax(teacher), q = softmax(student).

    Its gradient w.r.t. the student logits equals that of KL(p || q) (they differ by H(p))."""
    return soft_cross_entropy_probs(teacher_logits.detach().softmax(dim=1), student_logits)


def soft_cross_entropy_probs(p: Tensor, student_logits: Tensor) -> Tensor:
    """CE(p -> q) = -sum_j p_j log q_j averaged over rows, for target probabilities ``p`` (rows summing to 1)."""
    return -(p.detach() * student_logits.log_softmax(dim=1)).sum(dim=1).mean()


def require_teacher(teacher: ClipOutput | None, loss: str) -> ClipOutput:
    if teacher is None:
        raise ValueError(f"loss {loss!r} distils from a teacher, but no teacher output was given")
    return teacher.detach()
