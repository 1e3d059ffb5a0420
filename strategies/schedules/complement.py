"""The complement of another loss term's weight: MobileCLIP's mix of the CLIP loss and distillation.

MobileCLIP (Vasu et al., CVPR 2024) trains with L = (1 - lambda) L_CLIP + lambda L_distill, L_distill the KL
divergence between the teacher's and the student's image-text similarity distributions in both directions
(the ``affinity`` loss: its soft cross-entropy differs from that KL by the teacher's entropy, constant in the
student, so the gradients are equal). lambda is the distillation term's weight, with any schedule; the CLIP term
takes ``complement`` of it::

    losses: [{name: affinity, scale: model}, clip]
    schedules:
      weight/affinity: {name: linear_ramp, start: 0.0, end: 1.0, steps: 2000}   # lambda(t)
      weight/clip: {name: complement, of: weight/affinity}                      # 1 - lambda(t)

A term whose weight is 0 at a step is not computed, and the teacher is not called at a step where no term that
reads it has a weight other than 0: at lambda = 0 only the CLIP loss runs, at lambda = 1 only distillation.
"""

from __future__ import annotations

from collections.abc import Callable

from compress.plugins import Schedule
from compress.registry import SCHEDULES


@SCHEDULES.register("complement")
class Complement(Schedule):
    """w (1 - lambda(t)), lambda(t) the weight of the loss term named by ``of`` (a ``weight/<loss>`` key) at step
    t, w this term's configured weight (1 unless written). lambda must stay in [0, 1] over the run's steps
    (checked once, at every step, when the schedule is built: a negative weight would maximise a loss)."""

    def __init__(self, of: str, weight_of: Callable[[str], Callable[[int], float]] | None = None,
                 total_steps: int = 1, base_value: float = 1.0) -> None:
        if weight_of is None:
            raise ValueError("follows a loss term's weight: it is a schedule of a schedules.weight/<loss> key only")
        if not isinstance(of, str):
            raise ValueError(f"of: expected a schedules key such as 'weight/affinity', got {of!r}")
        self.of, self.base_value = of, float(base_value)
        self.mix = weight_of(of)
        outside = next((t for t in range(total_steps) if not 0.0 <= self.mix(t) <= 1.0), None)
        if outside is not None:
            raise ValueError(f"of: {of} is {self.mix(outside):g} at step {outside}, outside [0, 1]: the complement "
                             "1 - lambda would be negative or lambda not a mix; keep that weight in [0, 1]")

    def value(self, step: int) -> float:
        return self.base_value * (1.0 - float(self.mix(step)))
