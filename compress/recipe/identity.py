"""The run id: the config's identity (:mod:`compress.config.identity`) with every plug-in spec resolved.

A plug-in spec is hashed with its constructor's defaults filled in, except the parameters the engine supplies
(the plug-in's declared ``context``, a schedule's ``base_value`` / ``total_steps``): there the engine's value
applies, not the default. Writing a default out and omitting it give one id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.config.identity import canonical, hash_identity, identity_base, model_fingerprints
from compress.config.schema import RunConfig
from compress.config.specs import WEIGHT_KEY, split_loss
from compress.recipe.context import SCHEDULE_CONTEXT, declared_context
from compress.registry import INHERITANCE, LOSSES, SCHEDULES
from compress.rundir import RunDir, run_dir_name


def _resolved_losses(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    losses = []
    for spec in specs:
        params, weight = split_loss(spec)
        resolved = LOSSES.resolved(params, declared_context(LOSSES, params))
        losses.append({**_without_optional_defaults(LOSSES, resolved), WEIGHT_KEY: weight})
    return losses


def _without_optional_defaults(registry: Any, resolved: dict[str, Any]) -> dict[str, Any]:
    """A loss's or an inheritance's resolved spec without the parameters its class lists in ``identity_optional``
    where they are at their default (written out or not): parameters added after run ids were published leave those
    ids as they were."""
    name = resolved["name"]
    optional = getattr(registry.get(name), "identity_optional", ())
    if not optional:
        return resolved
    defaults = {p.name: p.default for p in registry.signature(name).parameters.values()}
    return {k: v for k, v in resolved.items()
            if not (k in optional and k in defaults and canonical(v) == canonical(defaults[k]))}


def _resolved_inheritance(spec: Any) -> dict[str, Any]:
    resolved = INHERITANCE.resolved(spec, declared_context(INHERITANCE, spec))
    return _without_optional_defaults(INHERITANCE, resolved) if isinstance(resolved, dict) else resolved


def _resolved_schedules(specs: dict[str, Any]) -> dict[str, Any]:
    return {k: SCHEDULES.resolved(s, SCHEDULE_CONTEXT) for k, s in specs.items()}


def identity_dict(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config without the sections and keys that do not change the result."""
    data = identity_base(cfg)
    data["inheritance"] = _resolved_inheritance(cfg.inheritance)
    data["losses"] = _resolved_losses(cfg.losses)
    data["schedules"] = _resolved_schedules(cfg.schedules)
    for stage in data["stages"]:  # plug-in specs of stages resolved the same way
        if stage["inheritance"] is not None:
            stage["inheritance"] = _resolved_inheritance(stage["inheritance"])
        if stage["losses"] is not None:
            stage["losses"] = _resolved_losses(stage["losses"])
        if stage["schedules"] is not None:
            stage["schedules"] = _resolved_schedules(stage["schedules"])
    if not data["stages"]:  # configs written before stages existed keep their ids
        del data["stages"]
    fingerprints = model_fingerprints(cfg)
    if fingerprints:  # a checkpoint replaced at the same path is another experiment
        data["model_files"] = fingerprints
    return canonical(data)


def run_id(cfg: RunConfig, length: int = 12) -> str:
    """A stable hash of what the run computes: equal resolved configs (execution settings aside)
    give equal ids, so resubmitting a sweep can skip finished runs."""
    return hash_identity(identity_dict(cfg), length)


def run_id_of(cfg: RunConfig) -> str:
    """The run id of ``cfg`` (:func:`run_id` at its usual length)."""
    return run_id(cfg)


def run_dir_for(cfg: RunConfig, run_id: str | None = None) -> Path:
    """``output.dir / (output.run_name or NAME-RUNID)``: a config's run directory, named by its run id (``run_id``
    where it is known already, as a Recipe's is; the layout inside it is :class:`compress.rundir.RunDir`'s, which
    knows no plug-in)."""
    return Path(cfg.output.dir) / (cfg.output.run_name or run_dir_name(cfg.name, run_id or run_id_of(cfg)))


def run_dir_of(cfg: RunConfig) -> RunDir:
    """The :class:`~compress.rundir.RunDir` of a config (:func:`run_dir_for`)."""
    return RunDir(run_dir_for(cfg))


def config_hash(cfg: RunConfig) -> str:
    """The hash a checkpoint records of the config it was written under: the whole resolved config that the
    run id is cut from."""
    return hash_identity(identity_dict(cfg))
