"""Built-in inheritance strategies."""

from strategies.inheritance import auto, manual, none  # noqa: F401
