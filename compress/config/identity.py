"""The run id: a stable hash of what a run computes.

It hashes the resolved config: plug-in specs with their constructor defaults filled in (so
``scale: 50`` written or omitted give one id), numbers in one form (``50`` and ``50.0`` are
equal), and without the settings that do not change the result (below). Sweeps skip a
finished run by this id, so leaving out a key that does change the result would be a bug;
when in doubt a key stays in.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from compress.config.schema import RunConfig
from compress.config.validate import INHERITANCE_CONTEXT, LOSS_CONTEXT, SCHEDULE_CONTEXT
from compress.registry import INHERITANCE, LOSSES, SCHEDULES

#: sections that describe where and how a run executes, not what it computes
NON_IDENTITY_SECTIONS = ("output", "dispatch")

#: keys that change how a run executes or reports, not the experiment. ``eval.batch_size`` and
#: ``train.device`` change floating-point reassociation only (zero-shot and retrieval score every
#: sample on its own); ``train.grad_checkpointing`` recomputes the same forward (RNG state
#: restored); ``eval.throughput`` is a timing, not a result. ``data.num_workers`` does not change
#: map-style training data (each sample's augmentation is seeded by (seed, epoch, index), see
#: ``compress.data.loader.SeededSamples``); for webdataset shards it changes the sample order
#: (shards are split across workers), a different draw of the same experiment.
NON_IDENTITY_KEYS: dict[str, tuple[str, ...]] = {
    "train": ("progress", "log_every", "checkpoint_every", "device", "grad_checkpointing"),
    "data": ("num_workers",),
    "eval": ("throughput", "batch_size"),
}


def _canonical(value: Any) -> Any:
    """One form per value: integers as floats (``50`` == ``50.0``), tuples as lists."""
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def identity_dict(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config without the sections and keys that do not change the result."""
    data = {k: v for k, v in cfg.to_dict().items() if k not in NON_IDENTITY_SECTIONS}
    for section, keys in NON_IDENTITY_KEYS.items():
        data[section] = {k: v for k, v in data[section].items() if k not in keys}
    data["inheritance"] = INHERITANCE.resolved(cfg.inheritance, INHERITANCE_CONTEXT)
    losses = []
    for spec in cfg.losses:
        params = dict(spec)
        weight = params.pop("weight", 1.0)
        losses.append({**LOSSES.resolved(params, LOSS_CONTEXT), "weight": weight})
    data["losses"] = losses
    data["schedules"] = {k: SCHEDULES.resolved(s, SCHEDULE_CONTEXT) for k, s in cfg.schedules.items()}
    return _canonical(data)


def run_id(cfg: RunConfig, length: int = 12) -> str:
    """A stable hash of what the run computes: equal resolved configs (execution settings aside)
    give equal ids, so resubmitting a sweep can skip finished runs."""
    blob = json.dumps(identity_dict(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]
