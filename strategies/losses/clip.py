"""The CLIP contrastive loss (InfoNCE), for training without a teacher or mixing in."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from compress.distributed import gather_with_grad, local_row_offset
from compress.outputs import ClipOutput
from compress.plugins import DistillLoss
from compress.registry import LOSSES
from strategies.losses.common import scaled_similarity


@LOSSES.register("clip")
class ClipContrastive(DistillLoss):
    """CLIP contrastive loss (InfoNCE) on the student's own logit_scale; uses no teacher.

    L = 0.5 (CE(s I T^T, y) + CE(s T I^T, y)), y_i = i (the matching pair)
    (Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
    ICML 2021). Local rows against all gathered columns, labels offset by the rank's first row.
    """

    similarity_matrices = 2  # i2t and t2i

    needs_teacher = False

    def forward(  # type: ignore[override]
        self, student: ClipOutput, teacher: ClipOutput | None = None, batch: Mapping[str, Any] | None = None
    ) -> dict[str, Tensor]:
        image, text, scale = student.image_features, student.text_features, student.logit_scale
        n = image.shape[0]
        labels = torch.arange(n, device=image.device) + local_row_offset(n)
        logits_i2t = scaled_similarity(image, gather_with_grad(text), scale)
        logits_t2i = scaled_similarity(text, gather_with_grad(image), scale)
        loss = 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))
        return {"contrastive": loss}
