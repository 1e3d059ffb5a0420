"""Embedding (feature) distillation between student and teacher, TinyCLIP's ablation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from compress.outputs import ClipOutput
from compress.plugins import DistillLoss
from compress.registry import LOSSES, suggest
from strategies.losses.common import check_weights, require_teacher

METRICS = ("mse", "cosine")


@LOSSES.register("feature_distill")
class FeatureDistill(DistillLoss):
    """Feature distillation: match the student's image and text embeddings to the teacher's.

    L = w_image d(P_I f_I^student, f_I^teacher) + w_text d(P_T f_T^student, f_T^teacher), with d the
    mean squared error or 1 - cosine similarity (the feature-distillation ablation of Wu et al.,
    "TinyCLIP", ICCV 2023; cf. FitNets, Romero et al. 2015, for the projector P).

    ``normalized=True`` compares the L2-normalised features (a projected student feature is
    normalised again); False the unnormalised ``image_embeds`` / ``text_embeds``. P is the
    identity when the embedding sizes agree, otherwise a learnable linear map per modality
    (student -> teacher size) owned by this loss, so the optimizer trains it.
    """

    needs: tuple[str, ...] = ("image_embeds", "text_embeds")
    context = ("student_embed_dim", "teacher_embed_dim")

    def __init__(
        self,
        metric: str = "mse",
        normalized: bool = True,
        weight_image: float = 0.5,
        weight_text: float = 0.5,
        student_embed_dim: int | None = None,
        teacher_embed_dim: int | None = None,
    ) -> None:
        check_weights(weight_image=weight_image, weight_text=weight_text)
        super().__init__()
        if metric not in METRICS:
            raise ValueError(
                f"metric: {metric!r} is not one of {', '.join(METRICS)}.{suggest(str(metric), list(METRICS))}"
            )
        self.metric = metric
        self.normalized = bool(normalized)
        self.weight_image = float(weight_image)
        self.weight_text = float(weight_text)
        self.needs = () if self.normalized else ("image_embeds", "text_embeds")
        self.projectors: nn.ModuleDict | None = None
        if student_embed_dim is not None and teacher_embed_dim is not None and student_embed_dim != teacher_embed_dim:
            self.projectors = nn.ModuleDict(
                {m: nn.Linear(student_embed_dim, teacher_embed_dim, bias=False) for m in ("image", "text")}
            )

    def _features(self, output: ClipOutput, modality: str, who: str) -> Tensor:
        if self.normalized:
            return getattr(output, f"{modality}_features")
        embeds = getattr(output, f"{modality}_embeds")
        if embeds is None:
            raise ValueError(
                f"feature_distill(normalized=False) reads the {who}'s {modality}_embeds, but the model output has none"
            )
        return embeds

    def _term(self, student: ClipOutput, teacher: ClipOutput, modality: str) -> Tensor:
        s = self._features(student, modality, "student")
        t = self._features(teacher, modality, "teacher")
        if self.projectors is not None:
            s = self.projectors[modality](s.to(self.projectors[modality].weight.dtype)).to(t.dtype)
            if self.normalized:
                s = F.normalize(s, dim=-1)
        if s.shape[-1] != t.shape[-1]:
            raise ValueError(
                f"feature_distill: student {modality} features have size {s.shape[-1]}, the teacher's "
                f"{t.shape[-1]}; give student_embed_dim and teacher_embed_dim to learn a projector"
            )
        if self.metric == "mse":
            return F.mse_loss(s, t)
        return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()

    def forward(  # type: ignore[override]
        self, student: ClipOutput, teacher: ClipOutput | None, batch: Mapping[str, Any] | None = None
    ) -> dict[str, Tensor]:
        teacher = require_teacher(teacher, "feature_distill")
        return {
            "feature_image": self.weight_image * self._term(student, teacher, "image"),
            "feature_text": self.weight_text * self._term(student, teacher, "text"),
        }
