"""The teacher's outputs read from a teacher-output cache: a :class:`~compress.teacher.TeacherSource` that computes
nothing.

The loader's workers put each sample's cached outputs for the view it trains on in the batch
(:class:`compress.data.views.FixedViewSamples`, entries ``teacher/<output>/<k>``); this source turns them into the
:class:`~compress.outputs.ClipOutput` the losses read, in float32 on the batch's device, with each teacher's logit
scale as the cache's manifest holds it. The teacher model is never moved to the device.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from compress.data.views import cached_key
from compress.outputs import ClipOutput

#: the outputs every cache holds (every distillation loss reads the normalised features)
REQUIRED_OUTPUTS = ("image_features", "text_features")


def missing_outputs(needs: Iterable[str], stored: Sequence[str]) -> list[str]:
    """The teacher outputs a loss reads (``needs``: :class:`ClipOutput` extras) that a cache storing ``stored``
    does not hold."""
    return sorted({*REQUIRED_OUTPUTS, *needs} - set(stored))


class CachedTeacher:
    """The teachers' outputs of a batch from its cached entries; ``scales``: each teacher's logit scale (already
    exponentiated), ``outputs``: what the cache stores, ``needs``: the extras the losses read."""

    def __init__(self, scales: Sequence[float], outputs: Sequence[str], needs: Iterable[str] = ()) -> None:
        missing = missing_outputs(needs, outputs)
        if missing:
            raise ValueError(f"the teacher cache holds {', '.join(outputs)}; the losses also read {', '.join(missing)}")
        self.scales = [float(s) for s in scales]
        self.extras = tuple(n for n in ("image_embeds", "text_embeds") if n in set(needs))
        self.calls = 0
        self._scales_on: dict[torch.device, list[torch.Tensor]] = {}  # made once per device: no copy per call

    def scales_on(self, device: torch.device) -> list[torch.Tensor]:
        if device not in self._scales_on:
            self._scales_on[device] = [torch.tensor(s, dtype=torch.float32, device=device) for s in self.scales]
        return self._scales_on[device]

    def member(self, batch: Mapping[str, Any], k: int) -> ClipOutput:
        device = batch["images"].device

        def read(name: str) -> torch.Tensor:
            return batch[cached_key(name, k)].to(device=device, dtype=torch.float32)

        extras = {name: read(name) for name in self.extras}
        scale = self.scales_on(device)[k]
        return ClipOutput(read("image_features"), read("text_features"), scale, **extras)

    def __call__(self, batch: Mapping[str, Any]) -> ClipOutput:
        self.calls += 1
        return ClipOutput.of_members([self.member(batch, k) for k in range(len(self.scales))])
