"""The config error type."""


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key path."""
