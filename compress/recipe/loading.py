"""A config file or dict -> a validated :class:`~compress.config.schema.RunConfig` (parsed, then its plug-ins checked).

The key names and types are checked first (:func:`compress.config.parsing.parse_config`), so a mistake there
fails before the plug-ins (and torch) are imported; then the plug-ins (:func:`compress.recipe.validate.validate`).
An error that a ``--set`` text brings in is an :class:`~compress.config.errors.OverrideError` naming it
(:func:`compress.config.parsing.blame`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from compress.config.errors import ConfigError, OverrideError
from compress.config.overrides import Override
from compress.config.parsing import blame, parse_config, read_config_file
from compress.config.schema import RunConfig
from compress.recipe.validate import validate


def config_from_dict(data: Mapping[str, Any], overrides: Sequence[Override] | None = None) -> RunConfig:
    """Defaults, then ``data`` on top, then the ``--set`` overrides on top of both (so that
    ``losses.0.weight=2`` works when ``data`` lists no losses), then validation."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"a config is a mapping at the top level, got {type(data).__name__}")
    overrides = list(overrides or [])
    try:
        cfg = parse_config(data, overrides)
    except OverrideError:
        raise
    except ConfigError as error:
        blame(error, data, overrides, parse_config)
    try:
        return validate(cfg)
    except OverrideError:
        raise
    except ConfigError as error:
        blame(error, data, overrides, _resolve)


def _resolve(data: Mapping[str, Any], overrides: list[Override]) -> RunConfig:
    return validate(parse_config(data, overrides))


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (safe loading only: no Python objects, no key twice), apply ``--set`` overrides,
    validate."""
    data = read_config_file(path)
    try:
        return config_from_dict(data, overrides)
    except OverrideError:
        raise
    except ConfigError as e:
        raise ConfigError(f"{Path(path)}: {e}") from None
