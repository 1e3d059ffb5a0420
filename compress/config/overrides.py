"""``--set key.path=value`` overrides on a plain config dict."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import yaml

from compress.config.errors import ConfigError, OverrideError
from compress.config.yamlio import yaml_error_text, yaml_load


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=3e-4`` -> (["train", "lr"], 3e-4); the value is parsed as YAML."""
    if "=" not in text:
        raise OverrideError(f"--set {text}: not of the form key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise OverrideError(f"--set {text}: no key before '='")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise OverrideError(f"--set {text}: cannot parse the value: {yaml_error_text(e)}") from None
    return key.split("."), value


#: an override: ``key.path=value`` text, or the key path and its value already parsed (a sweep's axes)
Override = str | tuple[list[str], Any]


def apply_overrides(data: dict[str, Any], overrides: Sequence[Override]) -> dict[str, Any]:
    """Set dotted keys in a plain config dict; list items are addressed by index
    (``losses.0.weight=2``). Unknown keys are left for validation to report. An error of a ``--set``
    text is an :class:`OverrideError` naming it."""
    data = copy.deepcopy(data)
    for override in overrides:
        if isinstance(override, str):
            keys, value = parse_override(override)
        else:
            keys, value = list(override[0]), copy.deepcopy(override[1])
        try:
            _set(data, keys, value)
        except ConfigError as error:
            if isinstance(override, str):
                raise OverrideError(f"--set {override}: {error}") from None
            raise ConfigError(f"override {'.'.join(keys)}={value!r}: {error}") from None
    return data


def _set(data: dict[str, Any], keys: list[str], value: Any) -> None:
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
                raise ConfigError(f"{where!r} is not a mapping")
    last = keys[-1]
    if isinstance(node, list):
        node[_list_index(node, last, ".".join(keys))] = value
    else:
        node[last] = value


def _list_index(node: list, key: str, where: str) -> int:
    if not key.lstrip("-").isdigit() or not -len(node) <= int(key) < len(node):
        raise ConfigError(f"{where!r}: {key!r} is not an index of a list of {len(node)}")
    return int(key)


def _list_item(node: list, key: str, where: str) -> Any:
    return node[_list_index(node, key, where)]
