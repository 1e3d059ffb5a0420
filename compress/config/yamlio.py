"""Safe YAML reading (no Python objects) that reads ``1e-4`` as a number and refuses duplicate keys.

Every YAML a user writes (run configs, sweep files, their base configs, ``--set`` values) is read here.
PyYAML keeps the last of two equal keys of a mapping without a word (``name:`` twice silently takes the
second); this loader refuses them, at any nesting level, naming the key and both lines. Keys merged in
with ``<<: *anchor`` may be overridden: that is what a merge key is for.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, SequenceNode

from compress.config.errors import ConfigError

MERGE_TAG = "tag:yaml.org,2002:merge"


class DuplicateKeyError(ConstructorError):
    """A mapping names one key twice: ``key`` (its dotted path, list items by index, as ``--set`` writes
    it), the 1-based ``line`` of the second and ``first_line`` of the first."""

    def __init__(self, key: str, line: int, first_line: int, mark: yaml.Mark | None) -> None:
        where = f"lines {first_line} and {line}" if first_line != line else f"twice on line {line}"
        super().__init__(None, None, f"duplicate key {key!r} ({where})", mark)
        self.key, self.line, self.first_line = key, line, first_line


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-4`` as a float (YAML 1.1 needs ``1.0e-4``)."""


def _check_duplicates(loader: _Loader, node: Node, path: tuple[str, ...], seen: set[int]) -> None:
    """Raise :class:`DuplicateKeyError` for the first mapping under ``node`` that names a key twice
    (keys compared as the values they construct to, so ``1`` and ``1.0`` are one key, as in the dict)."""
    if id(node) in seen:  # an alias of a node already walked (or a recursive one)
        return
    seen.add(id(node))
    if isinstance(node, SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicates(loader, item, (*path, str(i)), seen)
    elif isinstance(node, MappingNode):
        lines: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == MERGE_TAG:
                _check_duplicates(loader, value_node, path, seen)
                continue
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = lines.get(key)
            except TypeError:  # an unhashable key: the constructor reports it
                continue
            if first is not None:
                raise DuplicateKeyError(".".join((*path, str(key))), line, first, key_node.start_mark)
            lines[key] = line
            _check_duplicates(loader, value_node, (*path, str(key)), seen)


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
    """Parse YAML safely (no Python objects), with ``1e-4`` read as a number; a key named twice in one
    mapping raises :class:`DuplicateKeyError` (a ``yaml.YAMLError``)."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_duplicates(loader, node, (), set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def yaml_error_text(error: yaml.YAMLError) -> str:
    """A YAML error in one line: ``line N: what`` (PyYAML's own message spans several lines)."""
    if isinstance(error, DuplicateKeyError):
        return str(error.problem)
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    context = getattr(error, "context", None)
    what = " ".join(f"{problem}{f' ({context})' if context else ''}".split())
    return f"line {mark.line + 1}: {what}" if mark is not None else what


def read_yaml(path: str | Path) -> Any:
    """A YAML file a user wrote (a config, a sweep, a sweep's base): its data, or a one-line
    :class:`ConfigError` naming the file and line (``base.yaml: line 3: duplicate key 'name' ...``)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror or error}") from None
    try:
        return yaml_load(text)
    except DuplicateKeyError as error:
        raise ConfigError(f"{path}: {yaml_error_text(error)}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {yaml_error_text(error)}") from None
