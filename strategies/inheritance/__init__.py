"""Built-in inheritance strategies."""

from strategies.inheritance import auto, importance, manual, none  # noqa: F401
