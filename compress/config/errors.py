"""The config error types, and the "did you mean" hint of their messages."""

from __future__ import annotations

import difflib


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key path."""


class OverrideError(ConfigError):
    """One ``--set key.path=value`` override makes the config invalid; the message starts with that
    override (``--set train.lrate=1e-3: unknown key 'train.lrate' ...``), not with the config file."""


def suggest(name: str, known: list[str]) -> str:
    """`` Did you mean 'x'?`` for the closest known names, or an empty string."""
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"
