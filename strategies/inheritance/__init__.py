"""Built-in inheritance strategies."""

from strategies.inheritance import manual, none  # noqa: F401
