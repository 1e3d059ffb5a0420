"""Validation of a config, stages included: what the dataclasses cannot check, with the plug-ins."""

from __future__ import annotations

from compress.config.schema import RunConfig
from compress.config.validate import check_version
from compress.recipe.checks import validate_one
from compress.recipe.stages import resolve_stages


def validate(cfg: RunConfig) -> RunConfig:
    """Check what the dataclasses cannot: plug-in names, their parameters and values, ranges; a staged config
    through each stage's resolved config."""
    check_version(cfg)
    if cfg.stages:  # every stage runs as its own resolved config: check those
        resolve_stages(cfg)
        return cfg
    return validate_one(cfg)
