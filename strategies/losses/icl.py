"""Interactive contrastive learning (ICL), CLIP-KD's cross-model InfoNCE between student and teacher."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress.distributed import gather_no_grad, local_row_offset
from compress.outputs import ClipOutput
from compress.plugins import DistillLoss
from compress.registry import LOSSES
from strategies.losses.common import check_scale, check_weights, require_teacher, scale_of, scaled_similarity


@LOSSES.register("icl")
class InteractiveContrastive(DistillLoss):
    """CLIP-KD interactive contrastive learning: the student's image anchors contrast the teacher's texts,
    the student's text anchors the teacher's images.

    L_I2T = -1/N sum_i log( exp(s <P v_i^S, t_i^T>) / sum_j exp(s <P v_i^S, t_j^T>) ),
    L_T2I the same with the student's text features against the teacher's image features;
    L = w_i2t L_I2T + w_t2i L_T2I (Yang et al., "CLIP-KD: An Empirical Study of CLIP Model Distillation",
    CVPR 2024; their code weighs the two directions 1/2 each). The teacher side is detached;
    the negatives are the globally gathered teacher features (local student rows against all columns,
    labels offset by the rank's first row).

    ``scale``: a number fixes s; ``"model"`` uses the student's own learnable ``logit_scale`` (CLIP-KD
    learns a temperature for this term; the student's is the one that trains here). P is the identity when
    the embedding sizes agree, otherwise a learnable linear map per modality (student -> teacher size, as
    ``feature_distill``), the projected feature normalised again.
    """

    similarity_matrices = 2  # the student's rows against the teacher's columns, two directions
    context: ClassVar[tuple[str, ...]] = ("student_embed_dim", "teacher_embed_dim")

    def __init__(self, weight_i2t: float = 0.5, weight_t2i: float = 0.5, scale: float | str = "model",
                 student_embed_dim: int | None = None, teacher_embed_dim: int | None = None) -> None:
        check_weights(weight_i2t=weight_i2t, weight_t2i=weight_t2i)
        super().__init__()
        self.weight_i2t = float(weight_i2t)
        self.weight_t2i = float(weight_t2i)
        self.scale = check_scale(scale)
        self.projectors: nn.ModuleDict | None = None
        if student_embed_dim is not None and teacher_embed_dim is not None and student_embed_dim != teacher_embed_dim:
            self.projectors = nn.ModuleDict(
                {m: nn.Linear(student_embed_dim, teacher_embed_dim, bias=False) for m in ("image", "text")}
            )

    def _student(self, student: ClipOutput, modality: str, teacher_dim: int) -> Tensor:
        s = getattr(student, f"{modality}_features")
        if self.projectors is not None:
            s = F.normalize(self.projectors[modality](s.to(self.projectors[modality].weight.dtype)), dim=-1)
        if s.shape[-1] != teacher_dim:
            raise ValueError(
                f"icl: student {modality} features have size {s.shape[-1]}, the teacher's {teacher_dim}; "
                "give student_embed_dim and teacher_embed_dim to learn a projector"
            )
        return s

    def forward(  # type: ignore[override]
        self, student: ClipOutput, teacher: ClipOutput | None, batch: Mapping[str, Any] | None = None
    ) -> dict[str, Tensor]:
        teacher = require_teacher(teacher, "icl")
        s = scale_of(self.scale, student)
        dim = teacher.image_features.shape[-1]
        image, text = self._student(student, "image", dim), self._student(student, "text", dim)
        n = image.shape[0]
        labels = torch.arange(n, device=image.device) + local_row_offset(n)
        i2t = scaled_similarity(image, gather_no_grad(teacher.text_features), s)
        t2i = scaled_similarity(text, gather_no_grad(teacher.image_features), s)
        return {
            "icl_i2t": self.weight_i2t * F.cross_entropy(i2t, labels),
            "icl_t2i": self.weight_t2i * F.cross_entropy(t2i, labels),
        }
