"""A step's micro-batches as the gradient cache reads them: twice, the second time from a second stream.

A step takes ``accum_steps`` micro-batches; :class:`StepInputs` draws them one at a time for the
features pass and gives them again for the live pass, from a :class:`Replay` stream (no images kept
on the host) or, without one, from the first pass's. :func:`step_batch` is what the loss plug-ins get
of them (the step's texts and per-sample entries, concatenated); :func:`split_batch` cuts one
collated batch into equal micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from compress.precision import to_device
from compress.training_error import TrainingError


def split_batch(batch: Mapping[str, Any], parts: int) -> list[dict[str, Any]]:
    """Split every tensor (and list) of a batch into ``parts`` equal micro-batches."""
    if parts == 1:
        return [dict(batch)]
    size = len(batch["images"])
    if size % parts:
        raise TrainingError(f"batch of {size} cannot be split into {parts} equal micro-batches")
    step = size // parts
    return [
        {k: v[i * step : (i + 1) * step] if isinstance(v, Tensor | list) else v for k, v in batch.items()}
        for i in range(parts)
    ]


#: entries of a micro-batch the loss plug-ins do not get: the images (one micro-batch at a time goes to the
#: device) and the data path's bookkeeping (the samples' keys, the images' fingerprints)
NOT_FOR_LOSSES = ("images", "teacher_images", "keys", "fingerprints")
#: prefixes of per-model inputs: an ensemble member's view (``teacher_images/k``), a cached teacher output
#: (``teacher/<output>/<k>``): read by the teacher source from the micro-batch, not kept for the losses
TEACHER_INPUT_PREFIXES = ("teacher_images/", "teacher/")


def teacher_input(key: str) -> bool:
    """Whether a micro-batch entry is the images or a teacher's input (kept for one micro-batch only)."""
    return key in ("images", "teacher_images") or key.startswith(TEACHER_INPUT_PREFIXES)


def step_batch(micro: Sequence[Mapping[str, Any]], device: torch.device) -> dict[str, Any]:
    """What the loss plug-ins get as ``batch``: the step's texts (on ``device``) and the other
    per-sample entries of its micro-batches, concatenated (the entries of :data:`NOT_FOR_LOSSES`
    are left out)."""
    out: dict[str, Any] = {}
    for key, value in micro[0].items():
        if key in NOT_FOR_LOSSES or teacher_input(key):
            continue
        if isinstance(value, Tensor):
            out[key] = to_device(torch.cat([m[key] for m in micro]) if len(micro) > 1 else value, device)
        elif isinstance(value, list):
            out[key] = [x for m in micro for x in m[key]]
        else:
            out[key] = value
    return out


class Replay(Protocol):
    """A second stream of the training micro-batches (:class:`compress.data.pipeline.ReplayStream`)."""

    def begin_step(self) -> None:
        """Called before a step's first micro-batch is drawn from the first stream."""

    def again(self, first: Mapping[str, Any]) -> Mapping[str, Any]:
        """The step's next micro-batch a second time (``first``: what the first pass read of it, images left
        out: its keys and fingerprints)."""


class StepInputs:
    """One step's ``count`` micro-batches as the gradient cache reads them: :meth:`first` draws them one at
    a time (the features pass), :meth:`again` gives them a second time (the live pass) from ``replay``
    (nothing of the step's images is kept: host memory does not grow with ``accum_steps``) or, without
    one, from the first pass's micro-batches, kept (``batch_size / world`` samples per process). A single
    micro-batch is read once. :attr:`meta` keeps what the losses need of each micro-batch (no images)."""

    def __init__(self, draw: Callable[[], Mapping[str, Any]], count: int, replay: Replay | None = None) -> None:
        self.draw, self.count = draw, count
        self.replay = replay if count > 1 else None
        self.meta: list[dict[str, Any]] = []
        self.sizes: list[int] = []
        self._kept: list[Mapping[str, Any] | None] = []

    @classmethod
    def of(cls, micro: Sequence[Mapping[str, Any]]) -> StepInputs:
        """A step of micro-batches already in memory."""
        parts = iter(micro)
        return cls(lambda: next(parts), len(micro))

    def first(self) -> Iterator[Mapping[str, Any]]:
        if self.replay is not None:
            self.replay.begin_step()
        for _ in range(self.count):
            m = self.draw()
            self.sizes.append(len(m["images"]))
            self.meta.append({k: v for k, v in m.items() if not teacher_input(k)})
            if self.count > 1 and self.replay is None:
                self._kept.append(m)
            yield m

    def again(self) -> Iterator[Mapping[str, Any]]:
        for j in range(self.count):
            if self.replay is not None:
                yield self.replay.again(self.meta[j])
            else:
                m, self._kept[j] = self._kept[j], None  # released as the live pass goes
                assert m is not None
                yield m

    def skip(self) -> None:
        """Read the step's micro-batches without using them, as a step that uses them would: the data
        position (and the second stream's, kept in step with the first) moves on."""
        for _ in self.first():
            pass
        if self.replay is not None:
            for _ in self.again():
                pass
        self._kept.clear()
