"""Plug-in specs as written in a config: a name, or a mapping with ``name`` and parameters; a loss spec's ``weight``
is the engine's, not the loss's (one place reads it)."""

from __future__ import annotations

from typing import Any

#: the key of a loss spec that the engine reads (the term's weight), not a parameter of the loss
WEIGHT_KEY = "weight"


def plain_spec(spec: Any) -> dict[str, Any]:
    """A plug-in spec as a dict (a bare name is ``{"name": name}``)."""
    return {"name": spec} if isinstance(spec, str) else dict(spec)


def split_loss(spec: Any) -> tuple[dict[str, Any], Any]:
    """A loss spec -> (the loss's own spec, its weight as written: 1.0 when not)."""
    params = plain_spec(spec)
    return params, params.pop(WEIGHT_KEY, 1.0)
