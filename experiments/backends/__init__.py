"""Dispatch backends by name: ``inline``, ``debug``, ``local``, ``slurm`` (one file each), and third-party ones.

A backend is a :class:`~experiments.backends.base.Backend` subclass registered with :func:`register_backend`.
The built-ins are the modules named in :data:`BUILTIN_BACKENDS`; third-party backends are found through the
entry-point group ``clip_compress.backends`` (each entry point names a module whose import registers its
backends, or a ``Backend`` subclass), as plug-ins are (:mod:`compress.registry`). The engine's config
validation loads :func:`check_dispatch_section` by name (:data:`compress.config.dispatch.BUILTIN_SETTINGS_CHECK`)
on the first config it parses: the backend's name, and the backends' settings, with their defaults filled in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
from collections.abc import Iterator
from importlib.metadata import entry_points
from typing import Any

from compress.config import ConfigError
from compress.config.dispatch import COMMON_KEYS, DispatchConfig
from compress.registry import suggest
from experiments.backends.base import Backend, DispatchError, Submission

ENTRY_POINT_GROUP = "clip_compress.backends"
#: the built-in backends' modules (``experiments.backends.<name>``), in the order names are listed
BUILTIN_BACKENDS = ("inline", "debug", "local", "slurm")
#: a backend's name that changed: the name to use instead
RENAMED = {"inprocess": "inline"}

_backends: dict[str, type[Backend]] = {}
_loaded = False


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: register a backend under its ``name``; a name taken twice, or a setting another
    backend declares with another type or default, is refused."""
    if not cls.name:
        raise DispatchError(f"backend {cls.__qualname__} has no name")
    if cls.name in RENAMED:
        raise DispatchError(f"backend {cls.name!r}: the old name of {RENAMED[cls.name]!r}, not a new backend's")
    if cls.name in _backends:
        other = _backends[cls.name]
        raise DispatchError(f"backend {cls.name!r} is already registered (by {other.__module__}.{other.__qualname__})")
    mine = _fields(cls)
    clash = sorted(set(mine) & set(COMMON_KEYS))
    if clash:
        raise DispatchError(f"backend {cls.name!r}: dispatch.{clash[0]} is a common key, not a backend's setting")
    for other in _backends.values():
        for key, spec in _fields(other).items():
            if key in mine and mine[key] != spec:
                raise DispatchError(f"backend {cls.name!r}: dispatch.{key} is declared by backend {other.name!r} "
                                    f"with another type or default ({spec} against {mine[key]})")
    _backends[cls.name] = cls
    return cls


def _fields(cls: type[Backend]) -> dict[str, tuple[str, str]]:
    """A backend's setting keys, each with its type and default (as text)."""
    if cls.Settings is None:
        return {}
    defaults = _defaults(cls)
    return {f.name: (str(f.type), repr(defaults[f.name])) for f in dataclasses.fields(cls.Settings)}


def _load() -> None:
    """Import the built-in backends and every installed third-party backend, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in BUILTIN_BACKENDS:
        importlib.import_module(f"{__name__}.{name}")
    load_entry_points()


def load_entry_points() -> None:
    """Register the backends of the entry-point group ``clip_compress.backends``: an entry point naming a
    ``Backend`` subclass registers it (unless it is registered already); one naming a module registers what the
    module's import registers; a callable is called. Idempotent: a later call registers only what is new."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        loaded = ep.load()
        if isinstance(loaded, type) and issubclass(loaded, Backend):
            if _backends.get(loaded.name) is not loaded:
                register_backend(loaded)
        elif callable(loaded) and not inspect.ismodule(loaded):
            loaded()


def backend_names() -> list[str]:
    """Every registered backend's name, the built-ins first."""
    _load()
    return list(_backends)


def backend_class(name: str) -> type[Backend]:
    _load()
    return _backends[name]


def get_backend(name: str) -> Backend:
    """The backend named ``name``; an unknown name raises :class:`DispatchError` with close matches."""
    _load()
    if name not in _backends:
        hint = f" (renamed: use {RENAMED[name]!r})" if name in RENAMED else ""
        names = list(_backends)
        raise DispatchError(f"unknown backend {name!r}{hint}; one of {', '.join(names)}.{suggest(name, names)}")
    return _backends[name]()


def find(name: str | None) -> Backend | None:
    """The backend named ``name`` if one is registered (a manifest may name one not installed here), else None."""
    _load()
    return _backends[name]() if name in _backends else None


def names_where(**flags: bool) -> list[str]:
    """The backends whose class attributes have these values (``waits=False``: the ones that return at once)."""
    _load()
    return [n for n, cls in _backends.items() if all(getattr(cls, k) == v for k, v in flags.items())]


def setting_keys() -> list[str]:
    """Every key a ``dispatch`` section may hold: the common ones, then each backend's settings."""
    _load()
    keys = dict.fromkeys(COMMON_KEYS)
    for cls in _backends.values():
        keys.update(dict.fromkeys(_fields(cls)))
    return list(keys)


def check_dispatch_section(d: DispatchConfig, backend: str | None = None) -> None:
    """The config's check of ``dispatch`` (:data:`compress.config.dispatch.BUILTIN_SETTINGS_CHECK`): a known
    backend, no key that no backend has, every backend's settings parsed (types) and filled in with their
    defaults in ``d`` (the resolved section: the same keys whatever the config wrote, so that rows compare).
    A backend's own check (:meth:`Backend.check_settings`) runs for the chosen backend (``backend``: the one
    ``--backend`` chose, else ``dispatch.backend``) and for every backend one of whose settings is not at its
    default (``--backend`` may choose it later); a backend whose defaults its own check refuses does not break
    the others' runs."""
    _load()
    for where, name in (("dispatch.backend", d.backend), ("--backend", backend)):
        if name is None:
            continue
        if name in RENAMED:
            raise ConfigError(f"{where}: {name!r} was renamed: use {RENAMED[name]!r}")
        if name not in _backends:
            names = list(_backends)
            raise ConfigError(f"{where}: {name!r} is not one of {', '.join(names)}.{suggest(name, names)}")
    keys = setting_keys()
    for key in d:
        if key not in keys:
            raise ConfigError(f"unknown key 'dispatch.{key}'.{suggest(key, keys)} Valid keys of dispatch: "
                              f"{', '.join(keys)}")
    chosen = backend or d.backend
    resolved: dict[str, Any] = {}
    for cls in _backends.values():
        instance = cls()
        settings = instance.settings(d)
        if settings is None:
            continue
        values = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
        if cls.name == chosen or values != _defaults(cls):
            instance.check_settings(settings)
        resolved.update(values)
    common = {key: d.get(key, default) for key, default in COMMON_KEYS.items()}
    d.clear()
    d.update({**common, **resolved})  # in the order of setting_keys(), whatever order the config wrote


def _defaults(cls: type[Backend]) -> dict[str, Any]:
    """A backend's settings at their defaults."""
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(cls.Settings)}


def restart_count() -> int:
    """Inside a job: how often its scheduler restarted it (requeued after a preemption or a node failure), as
    the backend that restarts jobs recognises it (:meth:`Backend.restart_count`); 0 where none did. Every backend
    is asked, not only the run's ``dispatch.backend``: ``--backend`` submits a config whose section names another
    backend (the job's config keeps it), and each backend reads its own scheduler's variable
    (``SLURM_RESTART_COUNT``), which a job of another backend does not have."""
    _load()
    return max((cls.restart_count() for cls in _backends.values()), default=0)


@contextlib.contextmanager
def scoped() -> Iterator[None]:
    """Backends registered inside the block are unregistered when it ends (for tests)."""
    _load()
    saved = dict(_backends)
    try:
        yield
    finally:
        _backends.clear()
        _backends.update(saved)


__all__ = ["Backend", "DispatchError", "Submission", "backend_names", "get_backend", "register_backend", "scoped"]
