"""Built-in inheritance strategies."""

from strategies.inheritance import manual, none  # noqa: F401
from strategies.inheritance import auto  # noqa: F401
