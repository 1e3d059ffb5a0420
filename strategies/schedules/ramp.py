"""Ramps for targets that grow during training (target sparsity, loss weights)."""

from __future__ import annotations

from compress.plugins import Schedule
from compress.registry import SCHEDULES


@SCHEDULES.register("linear_ramp")
class LinearRamp(Schedule):
    """Linear ramp from ``start`` to ``end`` over ``steps`` steps after ``delay``, then constant.

    TinyCLIP ramps the target sparsity from 0 to its target over 1000 steps (CoFi's schedule)."""

    def __init__(self, end: float, start: float = 0.0, steps: int = 1000, delay: int = 0) -> None:
        if steps < 0 or delay < 0:
            raise ValueError("steps and delay must be >= 0")
        self.start, self.end, self.steps, self.delay = start, end, steps, delay

    def value(self, step: int) -> float:
        if step < self.delay:
            return self.start
        if self.steps == 0:
            return self.end
        progress = min((step - self.delay) / self.steps, 1.0)
        return self.start + (self.end - self.start) * progress
