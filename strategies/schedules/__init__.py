"""Built-in schedules."""

from strategies.schedules import lr, ramp, stages  # noqa: F401
