"""YAML and plain dicts -> schema dataclasses, with key-path errors (key names and types; no plug-in knowledge).

A config is validated, with its plug-ins, by :func:`compress.recipe.config_from_dict` and
:func:`compress.recipe.load_config`, which call :func:`parse_config` first.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

import yaml

from compress.config.errors import ConfigError, OverrideError, suggest
from compress.config.overrides import Override, apply_overrides, parse_override
from compress.config.schema import RunConfig
from compress.config.stages import expand_stage_chain
from compress.config.yamlio import read_yaml


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, path: str) -> Any:
    """``value`` as the type hint ``tp`` says (a config's field, a backend's setting), checked as a config's values
    are; a mismatch is a :class:`ConfigError` naming ``path``."""
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
                return coerce(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping for {_type_name(tp)}, got {value!r}")
        return from_dict(tp, value, path)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{path}: expected a list of {len(args)} values, got {value!r}")
        return tuple(coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return {k: coerce(v, args[1], f"{path}.{k}") for k, v in value.items()}
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


def from_dict(cls: type, data: Mapping[str, Any], path: str = "") -> Any:
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
        kwargs[key] = coerce(value, hints[key], where)
    return cls(**kwargs)


def _dataclass_of(tp: Any) -> type | None:
    """The dataclass in a field type (``ModelSpec | None`` -> ``ModelSpec``), or None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return None


def _merge(cls: type, base: Mapping[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` on top of ``base``: sections that are dataclasses merge key by key; everything else
    (plug-in specs, lists, free mappings) is replaced whole, so a YAML ``losses`` list replaces
    the default list instead of mixing with it. Unknown keys are kept for the parser to report."""
    hints = typing.get_type_hints(cls)
    out = dict(base)
    for key, value in data.items():
        sub = _dataclass_of(hints[key]) if key in hints else None
        if sub is not None and isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(sub, out[key], value)
        else:
            out[key] = value
    return out


def parse_config(data: Mapping[str, Any], overrides: list[Override]) -> RunConfig:
    """Defaults, ``data`` on top, then the ``--set`` overrides on top of both (so that ``losses.0.weight=2`` works
    when ``data`` lists no losses) -> the dataclasses (key names and types checked, not validated). With
    ``teachers``, ``teacher`` is ``teachers[0]`` (:func:`_first_teacher`)."""
    merged = apply_overrides(_merge(RunConfig, RunConfig().to_dict(), data), overrides)
    merged["stages"] = expand_stage_chain(merged.get("stages") or [])
    return _first_teacher(from_dict(RunConfig, merged), _writes_teacher(data, overrides))


def _writes_teacher(data: Mapping[str, Any], overrides: list[Override]) -> bool:
    """Whether the config or an override sets ``teacher`` itself (rather than leaving its default)."""
    keys = [parse_override(o)[0] if isinstance(o, str) else list(o[0]) for o in overrides]
    return "teacher" in data or any(k and k[0] == "teacher" for k in keys)


def _first_teacher(cfg: RunConfig, written: bool) -> RunConfig:
    """A teacher ensemble (``teachers``: two or more models) makes ``teacher`` its first member, the model students
    inherit from and sparsity is counted against; a ``teacher`` the config writes beside it must be that one."""
    if not cfg.teachers:
        return cfg
    if len(cfg.teachers) == 1:
        raise ConfigError("teachers: an ensemble needs at least two models; for one teacher write teacher: instead")
    if written and cfg.teacher != cfg.teachers[0]:
        raise ConfigError(
            "teacher: with teachers, teacher is teachers[0] (the inheritance source); drop teacher or make it "
            f"teachers[0], got {dataclasses.asdict(cfg.teacher) if cfg.teacher is not None else None}"
        )
    return dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teachers[0]))


def blame(error: ConfigError, data: Mapping[str, Any], overrides: list[Override],
           check: Callable[[Mapping[str, Any], list[Override]], Any]) -> NoReturn:
    """Raise ``error``, as an :class:`OverrideError` naming the ``--set`` text that brings it in where
    there is one: the last override of the shortest prefix of ``overrides`` with which ``check`` already
    fails with that message. Not renamed when the config fails so without overrides (the file's error) or
    that override is not a ``--set`` text (a sweep's axis value, which the sweep names). Runs only on the
    error path: at most one ``check`` per override."""
    message = str(error)
    culprit: Override | None = overrides[-1] if overrides else None
    if any(isinstance(o, str) for o in overrides):
        for k in range(len(overrides)):
            try:
                check(data, overrides[:k])
            except ConfigError as other:
                if str(other) == message:
                    culprit = overrides[k - 1] if k else None
                    break
    if isinstance(culprit, str):
        raise OverrideError(f"--set {culprit}: {message}") from None
    raise error


def read_config_file(path: str | Path) -> Any:
    """A YAML config file's data (safe loading only: no Python objects, no key twice)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = read_yaml(path)
    if data is None:
        raise ConfigError(f"config file {path} is empty")
    return data


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
