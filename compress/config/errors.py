"""The config error types."""


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key path."""


class OverrideError(ConfigError):
    """One ``--set key.path=value`` override makes the config invalid; the message starts with that
    override (``--set train.lrate=1e-3: unknown key 'train.lrate' ...``), not with the config file."""
