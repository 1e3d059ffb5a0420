"""Cross-modal affinity mimicking, TinyCLIP's distillation loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from compress.distributed import gather_no_grad, gather_with_grad
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


@LOSSES.register("affinity")
class AffinityMimicking(DistillLoss):
    """TinyCLIP affinity mimicking: the student copies the teacher's image-text affinities.

    A_i2t = softmax_row(s I T^T), A_t2i = softmax_row(s T I^T);
    L = w_i2t CE(A_i2t^teacher -> A_i2t^student) + w_t2i CE(A_t2i^teacher -> A_t2i^student)
    (Wu et al., "TinyCLIP", ICCV 2023). Local rows against all gathered columns.

    ``scale``: a number fixes s for both models (the official scripts use 50); ``"model"``
    uses each model's own ``logit_scale`` (the paper's learnable temperature).
    """

    similarity_matrices = 4  # teacher and student, two directions

    def __init__(self, weight_i2t: float = 0.5, weight_t2i: float = 0.5, scale: float | str = 50.0) -> None:
        check_weights(weight_i2t=weight_i2t, weight_t2i=weight_t2i)
        super().__init__()
        self.weight_i2t = float(weight_i2t)
        self.weight_t2i = float(weight_t2i)
        self.scale = check_scale(scale)

    def forward(  # type: ignore[override]
        self, student: ClipOutput, teacher: ClipOutput | None, batch: Mapping[str, Any] | None = None
    ) -> dict[str, Tensor]:
        teacher = require_teacher(teacher, "affinity")
        s_student = scale_of(self.scale, student)
        s_teacher = scale_of(self.scale, teacher, detach=True)
        all_student_image = gather_with_grad(student.image_features)
        all_student_text = gather_with_grad(student.text_features)
        all_teacher_image = gather_no_grad(teacher.image_features)
        all_teacher_text = gather_no_grad(teacher.text_features)

        ce_i2t = soft_cross_entropy(
            scaled_similarity(teacher.image_features, all_teacher_text, s_teacher),
            scaled_similarity(student.image_features, all_student_text, s_student),
        )
        ce_t2i = soft_cross_entropy(
            scaled_similarity(teacher.text_features, all_teacher_image, s_teacher),
            scaled_similarity(student.text_features, all_student_image, s_student),
        )
        return {"affinity_i2t": self.weight_i2t * ce_i2t, "affinity_t2i": self.weight_t2i * ce_t2i}
