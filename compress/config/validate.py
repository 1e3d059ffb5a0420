"""Checks the dataclasses cannot make: plug-in names and parameters, ranges, combinations."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from compress.config.errors import ConfigError
from compress.config.schema import DATASET_KINDS, SCHEMA_VERSION, RunConfig
from compress.registry import INHERITANCE, LOSSES, SCHEDULES, RegistryError, suggest


def _check_plugin(registry, spec: Any, where: str, extra: tuple[str, ...] = ()) -> None:
    try:
        name, params = registry.split_spec(spec)
        registry.check_params(name, params, extra)
    except RegistryError as e:
        raise ConfigError(f"{where}: {e}") from None


#: parameters the engine supplies to schedule constructors when they declare them
SCHEDULE_CONTEXT = ("base_value", "total_steps")


def validate(cfg: RunConfig) -> RunConfig:
    """Check what the dataclasses cannot: plug-in names and their parameters, ranges."""
    if cfg.schema_version != SCHEMA_VERSION:
        raise ConfigError(
            f"schema_version: this clip-compress reads version {SCHEMA_VERSION}, the config has "
            f"{cfg.schema_version}"
        )
    _check_plugin(INHERITANCE, cfg.inheritance, "inheritance")
    if not cfg.losses:
        raise ConfigError("losses: at least one loss term is needed")
    for i, spec in enumerate(cfg.losses):
        params = dict(spec)
        weight = params.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ConfigError(f"losses[{i}].weight: expected a number, got {weight!r}")
        _check_plugin(LOSSES, params, f"losses[{i}]")
    for key, spec in cfg.schedules.items():
        name, params = SCHEDULES.split_spec(spec) if isinstance(spec, str | Mapping) else ("", {})
        offered = tuple(k for k in SCHEDULE_CONTEXT if name in SCHEDULES and SCHEDULES.accepts(name, k))
        _check_plugin(SCHEDULES, spec, f"schedules.{key}", offered)
    if "lr" not in cfg.schedules:
        raise ConfigError("schedules.lr: a learning-rate schedule is required")
    if cfg.teacher is None and any(LOSSES.get(LOSSES.split_spec(s)[0]).needs_teacher for s in _loss_specs(cfg)):
        raise ConfigError("teacher: the configured losses need a teacher, but teacher is null")
    t = cfg.train
    for key in ("steps", "batch_size", "accum_steps"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key}: must be at least 1, got {getattr(t, key)}")
    if t.batch_size % t.accum_steps:
        raise ConfigError(
            f"train.batch_size ({t.batch_size}) must be divisible by train.accum_steps ({t.accum_steps})"
        )
    if t.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(
            f"train.precision: {t.precision!r} is not one of auto, fp32, bf16, fp16."
            f"{suggest(t.precision, ['auto', 'fp32', 'bf16', 'fp16'])}"
        )
    _check_data(cfg)
    if cfg.dispatch.backend not in ("inprocess", "local", "slurm"):
        raise ConfigError(
            f"dispatch.backend: {cfg.dispatch.backend!r} is not one of inprocess, local, slurm."
            f"{suggest(cfg.dispatch.backend, ['inprocess', 'local', 'slurm'])}"
        )
    _check_dispatch(cfg)
    return cfg


def _check_dispatch(cfg: RunConfig) -> None:
    d = cfg.dispatch
    if d.nodes < 1 or d.gpus_per_node < 0:
        raise ConfigError(f"dispatch: nodes must be >= 1 and gpus_per_node >= 0, got {d.nodes} and {d.gpus_per_node}")
    if d.nodes * max(d.gpus_per_node, 1) > 1:
        raise ConfigError(
            f"dispatch: {d.nodes} node(s) x {d.gpus_per_node} GPUs asks for multi-GPU training, which is not built "
            "yet (no DistributedDataParallel): use nodes: 1, gpus_per_node: 1"
        )


def _check_data(cfg: RunConfig) -> None:
    """Ranges of the data settings (the data sets themselves are opened before training)."""
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers: must be at least 0, got {cfg.data.num_workers}")
    for where, ds in (("data.train", cfg.data.train), ("data.val", cfg.data.val)):
        if ds is None:
            continue
        if ds.kind not in DATASET_KINDS:
            raise ConfigError(
                f"{where}.kind: {ds.kind!r} is not one of {', '.join(DATASET_KINDS)}."
                f"{suggest(ds.kind, list(DATASET_KINDS))}"
            )
        if isinstance(ds.max_bad_fraction, bool) or not 0.0 <= ds.max_bad_fraction < 1.0:
            raise ConfigError(f"{where}.max_bad_fraction: must be a fraction in [0, 1), got {ds.max_bad_fraction}")
        if ds.bad_window < 1:
            raise ConfigError(f"{where}.bad_window: must be at least 1 sample, got {ds.bad_window}")
        if ds.num_samples is not None and ds.num_samples < 1:
            raise ConfigError(f"{where}.num_samples: must be at least 1 (or null for all), got {ds.num_samples}")


def _loss_specs(cfg: RunConfig) -> list[dict[str, Any]]:
    return [{k: v for k, v in dict(s).items() if k != "weight"} for s in cfg.losses]
