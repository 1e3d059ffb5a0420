"""Run configuration: YAML -> validated dataclasses, dotted overrides, stable run id.

A config names plug-ins by registry name; their parameters are checked against the
plug-in's constructor at validation time, so a typo fails before anything is built.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from compress.registry import INHERITANCE, LOSSES, SCHEDULES, RegistryError, suggest

SCHEMA_VERSION = 1

PluginSpec = dict[str, Any]


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key path."""


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-4`` as a float (YAML 1.1 needs ``1.0e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """Parse YAML safely (no Python objects), with ``1e-4`` read as a number."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


# ---------------------------------------------------------------------------------------
# dataclasses
# ---------------------------------------------------------------------------------------
@dataclass
class ModelSpec:
    """A model: an open_clip name (``ViT-B-32``), ``name@pretrained_tag``, a checkpoint
    file (``.safetensors`` / ``.pt``), a model config JSON, or a directory exported by this
    project. ``pretrained`` is a tag or a checkpoint path for a named architecture."""

    model: str = "ViT-B-32"
    pretrained: str | None = None
    force_quick_gelu: bool = False


@dataclass
class DatasetConfig:
    """One data source. ``kind``: synthetic | csv | webdataset | folder."""

    kind: str = "synthetic"
    path: str | None = None
    split: str = "train"
    num_samples: int | None = None
    seed: int = 0
    image_key: str = "filepath"
    caption_key: str = "title"
    separator: str = ","
    max_bad_fraction: float = 0.01
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    train: DatasetConfig = field(default_factory=DatasetConfig)
    val: DatasetConfig | None = None
    num_workers: int = 0
    image_size: int | None = None


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 256
    accum_steps: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float | None = 5.0
    precision: str = "auto"
    device: str = "auto"
    log_every: int = 10
    checkpoint_every: int = 0
    max_nonfinite_in_row: int = 20
    grad_checkpointing: bool = False
    progress: bool = True


@dataclass
class ZeroShotTaskConfig:
    name: str = "zero_shot"
    kind: str = "synthetic"
    path: str | None = None
    task: str | None = None
    classnames: list[str] | None = None
    templates: list[str] | None = None


@dataclass
class EvalConfig:
    zero_shot: list[ZeroShotTaskConfig] = field(default_factory=list)
    retrieval: bool = True
    params: bool = True
    macs: bool = True
    throughput: bool = True
    batch_size: int = 128


@dataclass
class OutputConfig:
    dir: str = "runs"
    run_name: str | None = None
    save_checkpoint: bool = True


@dataclass
class DispatchConfig:
    backend: str = "inprocess"
    gpus_per_node: int = 1
    nodes: int = 1
    timeout_min: int = 60 * 24
    partition: str | None = None
    slurm_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    schema_version: int = SCHEMA_VERSION
    name: str = "run"
    seed: int = 0
    teacher: ModelSpec | None = field(default_factory=ModelSpec)
    student: ModelSpec | None = None
    inheritance: PluginSpec = field(default_factory=lambda: {"name": "manual"})
    losses: list[PluginSpec] = field(default_factory=lambda: [{"name": "affinity", "weight": 1.0}])
    schedules: dict[str, PluginSpec] = field(
        default_factory=lambda: {"lr": {"name": "warmup_cosine", "warmup_steps": 0}}
    )
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    dispatch: DispatchConfig = field(default_factory=DispatchConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def run_id(self) -> str:
        return run_id(self)


#: sections that describe where and how a run executes, not what it computes
NON_IDENTITY_SECTIONS = ("output", "dispatch")


# ---------------------------------------------------------------------------------------
# dict -> dataclass with key-path errors
# ---------------------------------------------------------------------------------------
def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_plain(v) for v in value]
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping for {_type_name(tp)}, got {value!r}")
        return _from_dict(tp, value, path)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{path}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return {k: _coerce(v, args[1], f"{path}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{path}: expected a number, got {value!r}") from None
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    return value


def _from_dict(cls: type, data: Mapping[str, Any], path: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in names:
            raise ConfigError(
                f"unknown key {where!r}.{suggest(str(key), names)} "
                f"Valid keys{' of ' + path if path else ''}: {', '.join(names)}"
            )
        kwargs[key] = _coerce(value, hints[key], where)
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------
# overrides, loading, validation
# ---------------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=3e-4`` -> (["train", "lr"], 3e-4); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has no key")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse value: {e}") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a plain config dict; list items are addressed by index
    (``losses.0.weight=2``). Unknown keys are left for validation to report."""
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node: Any = data
        for i, key in enumerate(keys[:-1]):
            where = ".".join(keys[: i + 1])
            if isinstance(node, list):
                node = _list_item(node, key, where)
            else:
                if node.get(key) is None:
                    node[key] = {}
                node = node[key]
                if not isinstance(node, dict | list):
                    raise ConfigError(f"override {text!r}: {where!r} is not a mapping")
        last = keys[-1]
        if isinstance(node, list):
            index = _list_index(node, last, text)
            node[index] = value
        else:
            node[last] = value
    return data


def _list_index(node: list, key: str, where: str) -> int:
    if not key.lstrip("-").isdigit() or not -len(node) <= int(key) < len(node):
        raise ConfigError(f"{where!r}: {key!r} is not an index of a list of {len(node)}")
    return int(key)


def _list_item(node: list, key: str, where: str) -> Any:
    return node[_list_index(node, key, where)]


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
    if cfg.dispatch.backend not in ("inprocess", "local", "slurm"):
        raise ConfigError(
            f"dispatch.backend: {cfg.dispatch.backend!r} is not one of inprocess, local, slurm."
            f"{suggest(cfg.dispatch.backend, ['inprocess', 'local', 'slurm'])}"
        )
    return cfg


def _loss_specs(cfg: RunConfig) -> list[dict[str, Any]]:
    return [{k: v for k, v in dict(s).items() if k != "weight"} for s in cfg.losses]


def config_from_dict(data: Mapping[str, Any], overrides: list[str] | None = None) -> RunConfig:
    if not isinstance(data, Mapping):
        raise ConfigError(f"a config is a mapping at the top level, got {type(data).__name__}")
    data = apply_overrides(dict(data), overrides or [])
    return validate(_from_dict(RunConfig, data))


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (safe loading only: no Python objects), apply ``--set`` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    try:
        return config_from_dict(data, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def identity_dict(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config without the sections that do not change the result."""
    return {k: v for k, v in cfg.to_dict().items() if k not in NON_IDENTITY_SECTIONS}


def run_id(cfg: RunConfig, length: int = 12) -> str:
    """A stable hash of what the run computes: equal configs (output and dispatch settings
    aside) give equal ids, so resubmitting a sweep can skip finished runs."""
    blob = json.dumps(identity_dict(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
