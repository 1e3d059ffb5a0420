"""The run id: a stable hash of what a run computes."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from compress.config.schema import RunConfig

#: sections that describe where and how a run executes, not what it computes
NON_IDENTITY_SECTIONS = ("output", "dispatch")


def identity_dict(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config without the sections that do not change the result."""
    return {k: v for k, v in cfg.to_dict().items() if k not in NON_IDENTITY_SECTIONS}


def run_id(cfg: RunConfig, length: int = 12) -> str:
    """A stable hash of what the run computes: equal configs (output and dispatch settings
    aside) give equal ids, so resubmitting a sweep can skip finished runs."""
    blob = json.dumps(identity_dict(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]
