"""``--set key.path=value`` overrides on a plain config dict."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import yaml

from compress.config.errors import ConfigError
from compress.config.yamlio import yaml_load


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


#: an override: ``key.path=value`` text, or the key path and its value already parsed (a sweep's axes)
Override = str | tuple[list[str], Any]


def apply_overrides(data: dict[str, Any], overrides: Sequence[Override]) -> dict[str, Any]:
    """Set dotted keys in a plain config dict; list items are addressed by index
    (``losses.0.weight=2``). Unknown keys are left for validation to report."""
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text) if isinstance(text, str) else (list(text[0]), copy.deepcopy(text[1]))
        shown = text if isinstance(text, str) else f"{'.'.join(keys)}={value!r}"
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
                    raise ConfigError(f"override {shown!r}: {where!r} is not a mapping")
        last = keys[-1]
        if isinstance(node, list):
            index = _list_index(node, last, shown)
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
