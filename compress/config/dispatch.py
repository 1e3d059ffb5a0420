"""The ``dispatch`` section of a config: where and with what a run executes (none of it changes the run id).

The engine knows only the keys every backend shares, the world size of a run: ``nodes`` x ``tasks_per_node``
processes train one run data-parallel; ``tasks_per_node`` defaults to ``gpus_per_node`` (one task per GPU), or 1
with ``gpus_per_node: 0``, and with GPUs it must equal ``gpus_per_node``. GPUs are requested only when
``gpus_per_node`` > 0; ``gpus_per_node: 0, tasks_per_node: N``: N CPU processes per node. ``backend`` names
the backend. Every other key is a backend's own setting (``experiments.backends``: ``max_parallel`` of
``local``, ``partition`` or ``slurm_options`` of ``slurm``, ...): the engine keeps them as written and leaves
their names, types and values to the dispatch layer's check, which runs where the engine parses a config:
:data:`BUILTIN_SETTINGS_CHECK`, imported by name on the first config parsed (as :mod:`compress.registry` imports
the built-in plug-ins: ``compress`` never imports ``experiments``), or one installed with
:func:`set_settings_check`. The check also fills in every backend's settings with their defaults (the resolved
section that ``config.yaml``, a result row and a sweep's manifest hold), readable as attributes
(``cfg.dispatch.timeout_min``). Where no dispatch layer is installed (the engine alone, which only runs in
this process) a backend other than ``inline`` or a key beyond the common ones is refused: it would have no
effect.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from compress.config.errors import ConfigError

#: the keys the engine reads, with their defaults (the rest of the section belongs to the backends)
COMMON_KEYS: dict[str, Any] = {"backend": "inline", "nodes": 1, "gpus_per_node": 1, "tasks_per_node": None}


class DispatchConfig(dict):
    """The ``dispatch`` mapping as written (the common keys filled in), with the common keys as attributes."""

    @classmethod
    def of(cls, value: Any, where: str = "dispatch") -> DispatchConfig:
        """``value`` (a mapping) with the common keys' defaults filled in, checked (:func:`check_dispatch`) as it
        is parsed: a mistake there fails before the plug-ins (and torch) are imported."""
        if isinstance(value, DispatchConfig):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for DispatchConfig, got {value!r}")
        out = cls({**COMMON_KEYS, **{str(k): v for k, v in value.items()}})
        if isinstance(out["backend"], int | float) and not isinstance(out["backend"], bool):
            out["backend"] = str(out["backend"])  # as a string key of the schema takes a number
        if not isinstance(out["backend"], str):
            raise ConfigError(f"{where}.backend: expected a string, got {out['backend']!r}")
        for key in ("nodes", "gpus_per_node", "tasks_per_node"):
            number = out[key]
            if isinstance(number, float) and number.is_integer():
                out[key] = number = int(number)
            if (number is not None or key != "tasks_per_node") and (isinstance(number, bool)
                                                                     or not isinstance(number, int)):
                raise ConfigError(f"{where}.{key}: expected an integer, got {number!r}")
        check_dispatch(out)
        return out

    def _get(self, key: str) -> Any:
        return self.get(key, COMMON_KEYS[key])

    backend = property(lambda self: self._get("backend"), lambda self, v: self.__setitem__("backend", v))
    nodes = property(lambda self: self._get("nodes"), lambda self, v: self.__setitem__("nodes", v))
    gpus_per_node = property(lambda self: self._get("gpus_per_node"),
                             lambda self, v: self.__setitem__("gpus_per_node", v))
    tasks_per_node = property(lambda self: self._get("tasks_per_node"),
                              lambda self, v: self.__setitem__("tasks_per_node", v))

    def __getattr__(self, name: str) -> Any:
        """A backend's setting (``timeout_min``, ``partition``, ...), filled in with its default by the check."""
        if name.startswith("_") or name not in self:
            raise AttributeError(f"dispatch has no setting {name!r}")
        return self[name]

    def tasks(self) -> int:
        """Processes per node: ``tasks_per_node``, else one per GPU (``gpus_per_node``), at least 1."""
        return self.tasks_per_node if self.tasks_per_node is not None else max(self.gpus_per_node, 1)


#: the dispatch layer's check of the backend and its settings, ``module:function``, imported on first use
BUILTIN_SETTINGS_CHECK = "experiments.backends:check_dispatch_section"

#: the check of the backend and its settings (``None``: :data:`BUILTIN_SETTINGS_CHECK` not loaded yet)
_settings_check: Callable[[DispatchConfig], None] | None = None


def set_settings_check(check: Callable[[DispatchConfig], None] | None) -> None:
    """Install ``check(dispatch)``: it raises :class:`ConfigError` naming the key for an unknown backend, or
    a setting no backend has or one with a bad value, and fills in the settings' defaults. ``None``: the built-in
    check (:data:`BUILTIN_SETTINGS_CHECK`) again."""
    global _settings_check
    _settings_check = check


def check_dispatch(d: DispatchConfig) -> None:
    """The common keys' ranges (what submitit and sbatch would otherwise refuse late), then the installed
    check of the backend and its settings."""
    for key, low in {"nodes": 1, "gpus_per_node": 0, "tasks_per_node": 1}.items():
        value = getattr(d, key)
        if value is not None and value < low:
            raise ConfigError(f"dispatch.{key}: must be at least {low}, got {value}")
    if d.tasks_per_node is not None and d.gpus_per_node > 0 and d.tasks_per_node != d.gpus_per_node:
        raise ConfigError(
            f"dispatch.tasks_per_node: {d.tasks_per_node} tasks for {d.gpus_per_node} GPUs per node "
            "(dispatch.gpus_per_node): each task uses one GPU; leave tasks_per_node unset, or set "
            "gpus_per_node: 0 for CPU processes"
        )
    settings_check()(d)


def settings_check() -> Callable[[DispatchConfig], None]:
    """The installed check, else :data:`BUILTIN_SETTINGS_CHECK` (imported once), else, where the dispatch layer is
    not installed, :func:`_engine_only`."""
    global _settings_check
    if _settings_check is None:
        module, _, name = BUILTIN_SETTINGS_CHECK.partition(":")
        try:
            _settings_check = getattr(importlib.import_module(module), name)
        except ModuleNotFoundError as error:
            if error.name is None or not f"{module}.".startswith(f"{error.name}."):
                raise
            _settings_check = _engine_only
    return _settings_check


def _engine_only(d: DispatchConfig) -> None:
    """Without a dispatch layer the engine runs a config in this process only: another backend, or a backend's
    setting, would have no effect and is refused."""
    if d.backend != COMMON_KEYS["backend"]:
        raise ConfigError(f"dispatch.backend: {d.backend!r} needs the dispatch layer ({BUILTIN_SETTINGS_CHECK}), "
                          f"which is not installed; only {COMMON_KEYS['backend']!r} runs without it")
    for key in d:
        if key not in COMMON_KEYS:
            raise ConfigError(f"unknown key 'dispatch.{key}': the dispatch layer ({BUILTIN_SETTINGS_CHECK}) that "
                              f"has the backends' settings is not installed. Valid keys of dispatch: "
                              f"{', '.join(COMMON_KEYS)}")
