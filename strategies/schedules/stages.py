"""Stage schedules: a chain of compression stages (TinyCLIP's progressive distillation)."""

from __future__ import annotations

from compress.plugins import Schedule
from compress.registry import SCHEDULES


@SCHEDULES.register("stages")
class Stages(Schedule):
    """A chain of compression stages; ``value(k)`` is stage k's target sparsity.

    The target is the fraction of prunable parameters removed (TinyCLIP's automatic path:
    0.25, 0.5, 0.75); each stage starts from the previous stage's student."""

    def __init__(self, targets: list[float], steps_per_stage: int | None = None) -> None:
        if not targets:
            raise ValueError("stages: targets must not be empty")
        if any(not 0.0 <= t < 1.0 for t in targets):
            raise ValueError(f"stages: targets are sparsities in [0, 1), got {targets}")
        if any(b < a for a, b in zip(targets, targets[1:], strict=False)):
            raise ValueError(f"stages: targets must not decrease, got {targets}")
        self.targets, self.steps_per_stage = list(targets), steps_per_stage

    def __len__(self) -> int:
        return len(self.targets)

    def value(self, step: int) -> float:
        """The target of stage ``step`` (0-based); past the last stage, the last target."""
        return self.targets[min(step, len(self.targets) - 1)]
