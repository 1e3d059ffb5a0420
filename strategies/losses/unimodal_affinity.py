"""Uni-modal affinity mimicking (image-image and text-text), TinyCLIP's ablation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from compress.distributed import gather_no_grad, gather_with_grad, local_row_offset
from compress.outputs import ClipOutput
from compress.plugins import DistillLoss
from compress.registry import LOSSES
from strategies.losses.common import (
    check_scale,
    check_weights,
    require_teacher,
    scale_of,
    scaled_similarity,
    soft_cross_entropy,
)


@LOSSES.register("unimodal_affinity")
class UnimodalAffinity(DistillLoss):
    """Uni-modal affinity mimicking: the student copies image-image and text-text affinities.

    A_ii = softmax_row(s I I^T), A_tt = softmax_row(s T T^T);
    L = w_image CE(A_ii^teacher -> A_ii^student) + w_text CE(A_tt^teacher -> A_tt^student)
    (the uni-modal ablation of Wu et al., "TinyCLIP", ICCV 2023).

    ``scale`` as in ``affinity``. ``exclude_self=True`` drops each row's own column (its
    self-similarity s is the row maximum and dominates the softmax at large s).
    """

    similarity_matrices = 4  # teacher and student, image-image and text-text

    def __init__(
        self,
        weight_image: float = 0.5,
        weight_text: float = 0.5,
        scale: float | str = 50.0,
        exclude_self: bool = False,
    ) -> None:
        check_weights(weight_image=weight_image, weight_text=weight_text)
        super().__init__()
        self.weight_image = float(weight_image)
        self.weight_text = float(weight_text)
        self.scale = check_scale(scale)
        self.exclude_self = bool(exclude_self)

    def _term(self, student: Tensor, teacher: Tensor, s_student: Tensor | float, s_teacher: Tensor | float) -> Tensor:
        student_logits = scaled_similarity(student, gather_with_grad(student), s_student)
        teacher_logits = scaled_similarity(teacher, gather_no_grad(teacher), s_teacher)
        if self.exclude_self:
            student_logits, teacher_logits = _drop_self(student_logits), _drop_self(teacher_logits)
        return soft_cross_entropy(teacher_logits, student_logits)

    def forward(  # type: ignore[override]
        self, student: ClipOutput, teacher: ClipOutput | None, batch: Mapping[str, Any] | None = None
    ) -> dict[str, Tensor]:
        teacher = require_teacher(teacher, "unimodal_affinity")
        s_student = scale_of(self.scale, student)
        s_teacher = scale_of(self.scale, teacher, detach=True)
        ce_ii = self._term(student.image_features, teacher.image_features, s_student, s_teacher)
        ce_tt = self._term(student.text_features, teacher.text_features, s_student, s_teacher)
        return {"affinity_ii": self.weight_image * ce_ii, "affinity_tt": self.weight_text * ce_tt}


def _drop_self(logits: Tensor) -> Tensor:
    """Remove from each local row i its own column (global index offset + i): [n, N] -> [n, N - 1]."""
    n, total = logits.shape
    rows = torch.arange(n, device=logits.device)
    keep = torch.ones(n, total, dtype=torch.bool, device=logits.device)
    keep[rows, rows + local_row_offset(n)] = False
    return logits[keep].view(n, total - 1)
