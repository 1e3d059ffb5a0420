"""Learning-rate schedules (absolute values: ``base_value`` is the configured lr)."""

from __future__ import annotations

import math

from compress.plugins import Schedule
from compress.registry import SCHEDULES


def cosine_factor(progress: float) -> float:
    """0.5 * (1 + cos(pi * progress)), progress clamped to [0, 1]."""
    return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


@SCHEDULES.register("warmup_cosine")
class WarmupCosine(Schedule):
    """Linear warm-up to the base value, then cosine decay to ``min_value`` (SGDR; CLIP/TinyCLIP recipe)."""

    def __init__(
        self, base_value: float, total_steps: int, warmup_steps: int = 0, min_value: float = 0.0
    ) -> None:
        if warmup_steps < 0 or total_steps < 1:
            raise ValueError("warmup_steps must be >= 0 and total_steps >= 1")
        if warmup_steps > total_steps:
            raise ValueError(
                f"warmup_steps ({warmup_steps}) is longer than the run (total_steps = {total_steps}): the value "
                "would never reach its base value; lower warmup_steps"
            )
        if not (base_value >= 0 and min_value >= 0):
            raise ValueError(f"base_value and min_value must be >= 0, got {base_value} and {min_value}")
        self.base_value, self.total_steps = base_value, total_steps
        self.warmup_steps, self.min_value = warmup_steps, min_value

    def value(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_value * (step + 1) / self.warmup_steps
        span = max(self.total_steps - self.warmup_steps, 1)
        factor = cosine_factor((step - self.warmup_steps) / span)
        return self.min_value + (self.base_value - self.min_value) * factor


@SCHEDULES.register("constant")
class Constant(Schedule):
    """A constant value (the base value unless ``value`` is given)."""

    def __init__(self, base_value: float = 1.0, value: float | None = None) -> None:
        self._value = base_value if value is None else value

    def value(self, step: int) -> float:
        return self._value


@SCHEDULES.register("step_decay")
class StepDecay(Schedule):
    """Multiply the base value by ``gamma`` at each milestone step."""

    def __init__(self, base_value: float, milestones: list[int], gamma: float = 0.1) -> None:
        if not gamma > 0 or any(m < 0 for m in milestones):
            raise ValueError(f"gamma must be > 0 and milestones >= 0, got gamma {gamma}, milestones {milestones}")
        self.base_value, self.milestones, self.gamma = base_value, sorted(milestones), gamma

    def value(self, step: int) -> float:
        return self.base_value * self.gamma ** sum(step >= m for m in self.milestones)
