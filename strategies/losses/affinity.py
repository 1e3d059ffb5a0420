"""Cross-modal affinity mimicking, TinyCLIP's distillation loss, against one teacher or an ensemble (MobileCLIP2)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
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
    soft_cross_entropy_probs,
)

#: how an ensemble's affinities combine into one target: the teachers' probabilities averaged after each one's
#: softmax (MobileCLIP2), or their logits averaged before one softmax (a product of experts)
ENSEMBLES = ("mean_probs", "mean_logits")


@LOSSES.register("affinity")
class AffinityMimicking(DistillLoss):
    """TinyCLIP affinity mimicking: the student copies the teacher's image-text affinities.

    A_i2t = softmax_row(s I T^T), A_t2i = softmax_row(s T I^T);
    L = w_i2t CE(A_i2t^teacher -> A_i2t^student) + w_t2i CE(A_t2i^teacher -> A_t2i^student)
    (Wu et al., "TinyCLIP", ICCV 2023). Local rows against all gathered columns.

    ``scale``: a number fixes s for both models (the official scripts use 50); ``"model"``
    uses each model's own ``logit_scale`` (the paper's learnable temperature).

    CLIP-KD's contrastive relational distillation (CRD; Yang et al., CVPR 2024),
    L_CRD = 1/2 (KL(A_i2t^teacher || A_i2t^student) + KL(A_t2i^teacher || A_t2i^student)) over the in-batch
    image-text similarity distributions at each model's own logit scale, is this loss with ``scale: model``
    and the default weights: CE(p -> q) = KL(p || q) + H(p), and the teacher's entropy H(p) does not depend on
    the student, so the gradients are equal and the values differ by 1/2 (H(A_i2t^teacher) + H(A_t2i^teacher))
    (tests/test_losses_clipkd.py). It is therefore not a separate loss.

    A teacher ensemble (``teachers:``; the teacher output's ``members``) with weights a_k (``teacher_weights``,
    normalised to sum 1; equal by default), each teacher k with its own features and scale s_k (its own
    ``logit_scale`` with ``scale: model``): ``ensemble: mean_probs`` (MobileCLIP2, Faghri et al. 2025) targets
    A_i2t = sum_k a_k softmax_row(s_k I_k T_k^T); ``mean_logits`` targets softmax_row(sum_k a_k s_k I_k T_k^T).
    The weighted sum of per-teacher terms, sum_k a_k CE(A_k -> A^student), is ``mean_probs`` exactly (the
    cross-entropy is linear in its target), so it is not a third choice. With an ensemble each teacher's own term
    w CE(A_k -> A^student) is logged as ``affinity_i2t/teacher<k>`` (a breakdown: not added; under
    ``mean_probs`` sum_k a_k of them is the term). With one teacher the loss is TinyCLIP's, bit for bit.
    ``teacher_scales``: a fixed s_k per teacher (MobileCLIP's distillation logit scales, e.g. 70 and 60), whatever
    ``scale`` says; the student's s still follows ``scale`` (a number, or its own learnable one with ``model``).
    """

    similarity_matrices = 4  # teacher and student, two directions (an ensemble: two more per further teacher)
    reads_ensemble = True
    context: ClassVar[tuple[str, ...]] = ("teacher_count",)
    identity_optional: ClassVar[tuple[str, ...]] = ("ensemble", "teacher_weights", "teacher_scales")

    def __init__(self, weight_i2t: float = 0.5, weight_t2i: float = 0.5, scale: float | str = 50.0,
                 ensemble: str = "mean_probs", teacher_weights: Sequence[float] | None = None,
                 teacher_scales: Sequence[float] | None = None, teacher_count: int | None = None) -> None:
        check_weights(weight_i2t=weight_i2t, weight_t2i=weight_t2i)
        super().__init__()
        self.weight_i2t = float(weight_i2t)
        self.weight_t2i = float(weight_t2i)
        self.scale = check_scale(scale)
        self.ensemble = _check_ensemble(ensemble, teacher_count)
        self.teacher_count = teacher_count
        self.teacher_weights = _check_teacher_weights(teacher_weights, teacher_count)
        self.teacher_scales = _check_teacher_scales(teacher_scales, teacher_count)

    def _weights(self, count: int) -> list[float]:
        if self.teacher_count is not None and count != self.teacher_count:
            raise ValueError(f"affinity: built for {self.teacher_count} teacher(s), the teacher output has {count}")
        weights = self.teacher_weights or [1.0] * count
        if len(weights) != count:
            raise ValueError(f"affinity: teacher_weights has {len(weights)} weights, the teacher output {count} "
                             "members")
        total = math.fsum(weights)
        return [w / total for w in weights]

    def forward(  # type: ignore[override]
        self, student: ClipOutput, teacher: ClipOutput | None, batch: Mapping[str, Any] | None = None
    ) -> dict[str, Tensor]:
        members = require_teacher(teacher, "affinity").ensemble
        weights = self._weights(len(members))
        s_student = scale_of(self.scale, student)
        all_student_image = gather_with_grad(student.image_features)
        all_student_text = gather_with_grad(student.text_features)
        student_i2t = scaled_similarity(student.image_features, all_student_text, s_student)
        student_t2i = scaled_similarity(student.text_features, all_student_image, s_student)
        teacher_i2t, teacher_t2i = [], []
        if self.teacher_scales is not None and len(self.teacher_scales) != len(members):
            raise ValueError(f"affinity: teacher_scales has {len(self.teacher_scales)} scales, the teacher output "
                             f"{len(members)} members")
        for k, m in enumerate(members):
            s_teacher = self.teacher_scales[k] if self.teacher_scales else scale_of(self.scale, m, detach=True)
            teacher_i2t.append(scaled_similarity(m.image_features, gather_no_grad(m.text_features), s_teacher))
            teacher_t2i.append(scaled_similarity(m.text_features, gather_no_grad(m.image_features), s_teacher))
        terms = {
            "affinity_i2t": self.weight_i2t * soft_cross_entropy_probs(self._target(teacher_i2t, weights), student_i2t),
            "affinity_t2i": self.weight_t2i * soft_cross_entropy_probs(self._target(teacher_t2i, weights), student_t2i),
        }
        if len(members) > 1:
            with torch.no_grad():  # the breakdown: each teacher's own term, logged (no graph)
                for name, weight, logits, mine in (("affinity_i2t", self.weight_i2t, teacher_i2t, student_i2t),
                                                   ("affinity_t2i", self.weight_t2i, teacher_t2i, student_t2i)):
                    log_q = mine.log_softmax(dim=1)
                    for k, t in enumerate(logits):
                        terms[f"{name}/teacher{k}"] = weight * -(t.softmax(dim=1) * log_q).sum(dim=1).mean()
        return terms

    def _target(self, logits: list[Tensor], weights: list[float]) -> Tensor:
        """The ensemble's target probabilities (one teacher: its softmax)."""
        if len(logits) == 1:
            return logits[0].softmax(dim=1)
        if self.ensemble == "mean_logits":
            return sum((w * t for w, t in zip(weights, logits, strict=True)), logits[0].new_zeros(())).softmax(dim=1)
        return sum((w * t.softmax(dim=1) for w, t in zip(weights, logits, strict=True)), logits[0].new_zeros(()))


def _check_ensemble(ensemble: str, teacher_count: int | None) -> str:
    if ensemble == "sum_terms":
        raise ValueError("ensemble: 'sum_terms' (sum_k a_k CE(A_k -> A_student)) equals 'mean_probs' exactly (the "
                         "cross-entropy is linear in its target): use mean_probs")
    if ensemble not in ENSEMBLES:
        raise ValueError(f"ensemble: expected one of {', '.join(ENSEMBLES)}, got {ensemble!r}")
    if ensemble != ENSEMBLES[0] and teacher_count == 1:
        raise ValueError(f"ensemble: {ensemble!r} combines several teachers (teachers:), this run has one teacher")
    return ensemble


def _check_teacher_scales(scales: Sequence[float] | None, teacher_count: int | None) -> list[float] | None:
    """Fixed logit scales, one per teacher, > 0 (where the number of teachers is known)."""
    if scales is None:
        return None
    if isinstance(scales, str) or not isinstance(scales, Sequence):
        raise ValueError(f"teacher_scales: expected a list of numbers, one per teacher, got {scales!r}")
    if not all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0 for x in scales):
        raise ValueError(f"teacher_scales: every scale must be a finite number > 0, got {list(scales)}")
    if teacher_count is not None and len(scales) != teacher_count:
        raise ValueError(f"teacher_scales: {len(scales)} scales for {teacher_count} teacher(s)")
    return [float(x) for x in scales]


def _check_teacher_weights(weights: Sequence[float] | None, teacher_count: int | None) -> list[float] | None:
    """Finite numbers >= 0 with a positive sum, one per teacher (where the number of teachers is known)."""
    if weights is None:
        return None
    if isinstance(weights, str) or not isinstance(weights, Sequence):
        raise ValueError(f"teacher_weights: expected a list of numbers, one per teacher, got {weights!r}")
    check_weights(**{f"teacher_weights[{k}]": w for k, w in enumerate(weights)})
    if not math.fsum(weights) > 0:
        raise ValueError(f"teacher_weights: the weights must not all be 0, got {list(weights)}")
    if teacher_count is not None and len(weights) != teacher_count:
        raise ValueError(f"teacher_weights: {len(weights)} weights for {teacher_count} teacher(s) (teachers:)")
    if teacher_count == 1:
        raise ValueError("teacher_weights: weighs the members of a teacher ensemble (teachers:), this run has one")
    return [float(w) for w in weights]
