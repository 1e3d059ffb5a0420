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
import os
from pathlib import Path
from typing import Any

from compress.config.schema import RunConfig
from compress.config.validate import INHERITANCE_CONTEXT, LOSS_CONTEXT, SCHEDULE_CONTEXT
from compress.registry import INHERITANCE, LOSSES, SCHEDULES

#: sections that describe where and how a run executes, not what it computes
NON_IDENTITY_SECTIONS = ("output", "dispatch")

#: keys that change how a run executes or reports, not the experiment. ``eval.batch_size`` and
#: ``train.device`` change floating-point reassociation only (zero-shot and retrieval score every
#: sample on its own); ``train.grad_checkpointing`` recomputes the same forward (RNG state
#: restored); ``train.compile`` runs the same forward through compiled kernels (reassociation only);
#: ``train.accum_inputs`` reads the same micro-batches a second time or keeps them (the same step);
#: ``eval.throughput`` is a timing, not a result. ``data.num_workers`` does not change
#: map-style training data (each sample's augmentation is seeded by (seed, epoch, index), see
#: ``compress.data.sampling.SeededSamples``); for webdataset shards it changes the sample order
#: (shards are split across workers), a different draw of the same experiment.
NON_IDENTITY_KEYS: dict[str, tuple[str, ...]] = {
    "train": ("progress", "log_every", "checkpoint_every", "device", "grad_checkpointing", "compile",
              "accum_inputs"),
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


def file_fingerprint(path: str | os.PathLike[str]) -> str | None:
    """Size and modification time of a local file, or of every file below a folder (names
    included); ``None`` if nothing is there. Cheap for multi-GB checkpoints, and it changes
    when a checkpoint is replaced at the same path."""
    root = Path(path)
    if not root.exists():
        return None
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for f in files:
        stat = f.stat()
        digest.update(f"{f.relative_to(root) if f != root else f.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def model_fingerprints(cfg: RunConfig) -> dict[str, str]:
    """Fingerprints of the local files the teacher and the students (of every stage) are read from
    (``model`` and ``pretrained`` paths); open_clip names and tags have none."""
    out: dict[str, str] = {}
    roles = [("teacher", cfg.teacher), ("student", cfg.student)]
    roles += [(f"stages[{i}].student", stage.student) for i, stage in enumerate(cfg.stages)]
    for role, spec in roles:
        if spec is None:
            continue
        for key in ("model", "pretrained"):
            value = getattr(spec, key)
            if not value:
                continue
            path = value.removeprefix("local-dir:")
            if "@" in path and not Path(path).exists():
                path = path.split("@", 1)[0]
            fingerprint = file_fingerprint(path) if ("/" in path or Path(path).exists()) else None
            if fingerprint is not None:
                out[f"{role}.{key}"] = fingerprint
    return out


def _resolved_losses(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    losses = []
    for spec in specs:
        params = dict(spec)
        weight = params.pop("weight", 1.0)
        losses.append({**LOSSES.resolved(params, LOSS_CONTEXT), "weight": weight})
    return losses


def _resolved_schedules(specs: dict[str, Any]) -> dict[str, Any]:
    return {k: SCHEDULES.resolved(s, SCHEDULE_CONTEXT) for k, s in specs.items()}


def identity_dict(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config without the sections and keys that do not change the result."""
    data = {k: v for k, v in cfg.to_dict().items() if k not in NON_IDENTITY_SECTIONS}
    for section, keys in NON_IDENTITY_KEYS.items():
        data[section] = {k: v for k, v in data[section].items() if k not in keys}
    data["inheritance"] = INHERITANCE.resolved(cfg.inheritance, INHERITANCE_CONTEXT)
    data["losses"] = _resolved_losses(cfg.losses)
    data["schedules"] = _resolved_schedules(cfg.schedules)
    for stage in data["stages"]:  # plug-in specs of stages resolved the same way
        stage["train"] = {k: v for k, v in stage["train"].items() if k not in NON_IDENTITY_KEYS["train"]}
        if stage["inheritance"] is not None:
            stage["inheritance"] = INHERITANCE.resolved(stage["inheritance"], INHERITANCE_CONTEXT)
        if stage["losses"] is not None:
            stage["losses"] = _resolved_losses(stage["losses"])
        if stage["schedules"] is not None:
            stage["schedules"] = _resolved_schedules(stage["schedules"])
    if not data["stages"]:  # configs written before stages existed keep their ids
        del data["stages"]
    fingerprints = model_fingerprints(cfg)
    if fingerprints:  # a checkpoint replaced at the same path is another experiment
        data["model_files"] = fingerprints
    return _canonical(data)


def run_id(cfg: RunConfig, length: int = 12) -> str:
    """A stable hash of what the run computes: equal resolved configs (execution settings aside)
    give equal ids, so resubmitting a sweep can skip finished runs."""
    blob = json.dumps(identity_dict(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]
