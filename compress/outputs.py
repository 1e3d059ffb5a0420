"""What towers return: the one data structure every loss plug-in consumes."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class ClipOutput:
    """Outputs of a CLIP model on one batch of (image, text) pairs.

    ``image_features`` / ``text_features`` are L2-normalised, ``logit_scale`` is already
    exponentiated (s = 1 / tau). The optional extras (the unnormalised embeddings, for
    feature distillation) are filled on request for the losses that name them in ``needs``.
    """

    image_features: Tensor
    text_features: Tensor
    logit_scale: Tensor
    image_embeds: Tensor | None = None
    text_embeds: Tensor | None = None

    def detach(self) -> ClipOutput:
        return ClipOutput(**{f.name: _maybe(getattr(self, f.name), Tensor.detach) for f in fields(self)})

    def to(self, device: torch.device | str) -> ClipOutput:
        return ClipOutput(**{f.name: _maybe(getattr(self, f.name), lambda t: t.to(device)) for f in fields(self)})

    @staticmethod
    def cat(parts: list[ClipOutput]) -> ClipOutput:
        """Concatenate micro-batch outputs along the batch axis (the scale is taken from the first)."""
        out = {}
        for f in fields(ClipOutput):
            values = [getattr(p, f.name) for p in parts]
            if f.name == "logit_scale":
                out[f.name] = values[0]
            elif values[0] is None:
                out[f.name] = None
            else:
                out[f.name] = torch.cat(values, dim=0)
        return ClipOutput(**out)


def _maybe(value, fn):
    return None if value is None else fn(value)
