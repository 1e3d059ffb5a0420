"""Built-in plug-ins: importing this package registers them (the registry does it lazily)."""

from strategies import inheritance, losses, schedules  # noqa: F401
