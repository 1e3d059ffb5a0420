"""What towers return: the one data structure every loss plug-in consumes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor


@dataclass
class ClipOutput:
    """Outputs of a CLIP model on one batch of (image, text) pairs.

    ``image_features`` / ``text_features`` are L2-normalised, ``logit_scale`` is already
    exponentiated (s = 1 / tau). The optional extras (the unnormalised embeddings, for
    feature distillation) are filled on request for the losses that name them in ``needs``.

    ``members``: a teacher ensemble's output lists one ClipOutput per teacher (in the order of the config's
    ``teachers``, each with its own features, embedding size and logit scale); the output's own fields are then
    member 0's (the first teacher's), so a loss that reads no ensemble sees the first teacher. ``None``: one model.
    """

    image_features: Tensor
    text_features: Tensor
    logit_scale: Tensor
    image_embeds: Tensor | None = None
    text_embeds: Tensor | None = None
    members: list[ClipOutput] | None = None

    @staticmethod
    def of_members(members: list[ClipOutput]) -> ClipOutput:
        """An ensemble's output: member 0's fields (the same tensors) with ``members``; one member is that member."""
        if not members:
            raise ValueError("ClipOutput.of_members: no members")
        if len(members) == 1:
            return members[0]
        first = members[0]
        return ClipOutput(**{f.name: getattr(first, f.name) for f in fields(first) if f.name != "members"},
                          members=list(members))

    @property
    def ensemble(self) -> list[ClipOutput]:
        """The teachers' outputs: ``members``, or ``[self]`` for one model."""
        return list(self.members) if self.members is not None else [self]

    def _map(self, fn: Callable[[Tensor], Tensor]) -> ClipOutput:
        if self.members is not None:  # member 0's tensors stay the output's own
            return ClipOutput.of_members([m._map(fn) for m in self.members])
        return ClipOutput(**{f.name: _maybe(getattr(self, f.name), fn) for f in fields(self)})

    def detach(self) -> ClipOutput:
        return self._map(Tensor.detach)

    def to(self, device: torch.device | str) -> ClipOutput:
        return self._map(lambda t: t.to(device))

    @staticmethod
    def cat(parts: list[ClipOutput]) -> ClipOutput:
        """Concatenate micro-batch outputs along the batch axis (the scale is taken from the first); an ensemble's
        members are concatenated member by member (every part must have as many)."""
        members = _cat_members([p.members for p in parts])
        if members is not None:
            return ClipOutput.of_members(members)
        out: dict[str, Any] = {"members": None}
        for f in fields(ClipOutput):
            values = [getattr(p, f.name) for p in parts]
            if f.name == "members":
                continue
            if f.name == "logit_scale":
                out[f.name] = values[0]
            elif values[0] is None:
                out[f.name] = None
            else:
                out[f.name] = torch.cat(values, dim=0)
        return ClipOutput(**out)


def _cat_members(values: list[list[ClipOutput] | None]) -> list[ClipOutput] | None:
    if len({v is None for v in values}) > 1:
        raise ValueError("ClipOutput.cat: some parts are ensembles (members) and others are not")
    if values[0] is None:
        return None
    counts = {len(v) if v is not None else None for v in values}
    if len(counts) != 1:
        raise ValueError(f"ClipOutput.cat: parts with different numbers of members {sorted(map(str, counts))}")
    return [ClipOutput.cat([v[k] for v in values]) for k in range(len(values[0]))]  # type: ignore[index]


def _maybe(value, fn):
    return None if value is None else fn(value)
