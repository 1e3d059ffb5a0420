"""Where the trainer gets the teacher's outputs: one interface, computed online for now.

A teacher-output cache (outputs stored per sample id) can implement the same call."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import torch
from torch import nn

from compress.models.forward import clip_forward
from compress.outputs import ClipOutput
from compress.precision import Precision


class TeacherSource(Protocol):
    def __call__(self, batch: Mapping[str, Any]) -> ClipOutput: ...


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: a teacher is never trained and never DDP-wrapped."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class OnlineTeacher:
    """Runs the frozen teacher on every batch (under no_grad and the run's autocast), on the
    batch's ``teacher_images`` when the data pipeline prepared the teacher its own view (another
    size or normalisation than the student's), else on ``images``."""

    def __init__(self, teacher: nn.Module, precision: Precision, needs: Iterable[str] = ()) -> None:
        self.teacher = freeze(teacher)
        self.precision = precision
        self.needs = tuple(needs)

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, Any]) -> ClipOutput:
        with self.precision.autocast():
            images = batch.get("teacher_images", batch["images"])
            out = clip_forward(self.teacher, images, batch["texts"], self.needs)
        return out.detach()
