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
    _check_schedules(cfg)
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


#: ``schedules`` key of a loss weight: ``weight/<loss name>`` (or ``weight/<loss index>``)
WEIGHT_PREFIX = "weight/"


def loss_weight_keys(losses: list[Mapping[str, Any]]) -> dict[str, int]:
    """The ``schedules`` keys that set a loss term's weight -> the term's index in ``losses``:
    ``weight/<name>`` for a loss name used once, ``weight/<index>`` for every term."""
    names = [spec.get("name") if isinstance(spec, Mapping) else spec for spec in losses]
    keys = {f"{WEIGHT_PREFIX}{name}": i for i, name in enumerate(names) if names.count(name) == 1}
    keys.update({f"{WEIGHT_PREFIX}{i}": i for i in range(len(losses))})
    return keys


def _check_schedules(cfg: RunConfig) -> None:
    """``schedules``: ``lr`` (required; base value ``train.lr``) and ``weight/<loss>`` (base value
    the loss's ``weight``); each a schedule plug-in whose parameters fit its constructor."""
    if "lr" not in cfg.schedules:
        raise ConfigError("schedules.lr: a learning-rate schedule is required")
    weight_keys = loss_weight_keys(cfg.losses)
    scheduled: dict[int, str] = {}
    for key, spec in cfg.schedules.items():
        if key != "lr" and key not in weight_keys:
            names = [k for k in weight_keys if not k[len(WEIGHT_PREFIX):].isdigit()]
            shared = key.startswith(WEIGHT_PREFIX) and any(
                isinstance(s, Mapping) and s.get("name") == key[len(WEIGHT_PREFIX):] for s in cfg.losses
            )
            why = "two losses share that name: address one by index" if shared else "unknown schedule key"
            raise ConfigError(
                f"schedules.{key}: {why}.{suggest(key, ['lr', *names])} Valid keys: lr, "
                f"{', '.join(names + ['weight/<loss index>'])}"
            )
        if key != "lr":
            index = weight_keys[key]
            if index in scheduled:
                raise ConfigError(f"schedules.{key}: losses[{index}] already has a schedule ({scheduled[index]})")
            scheduled[index] = key
        name = SCHEDULES.split_spec(spec)[0] if isinstance(spec, str | Mapping) else ""
        offered = tuple(k for k in SCHEDULE_CONTEXT if name in SCHEDULES and SCHEDULES.accepts(name, k))
        _check_plugin(SCHEDULES, spec, f"schedules.{key}", offered)


def _loss_specs(cfg: RunConfig) -> list[dict[str, Any]]:
    return [{k: v for k, v in dict(s).items() if k != "weight"} for s in cfg.losses]
