"""Name -> plug-in registries for losses, inheritance strategies and schedules.

Modelled on timm's model registry: plug-ins register with a decorator, are looked up by
name, and are built from a config spec (a name, or ``{name: ..., **params}``) after the
params were checked against the constructor's signature.

Built-in plug-ins live in the ``strategies`` package and are imported lazily on the first
lookup (``compress`` never imports ``strategies`` at module level). Third-party plug-ins
are found through the entry-point group ``clip_compress.strategies``: each entry point
names a module (or a callable) whose import registers its plug-ins.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from compress.config.errors import suggest

T = TypeVar("T")

ENTRY_POINT_GROUP = "clip_compress.strategies"
BUILTIN_PLUGIN_MODULE = "strategies"


class RegistryError(ValueError):
    """A plug-in could not be found, registered or built."""


@dataclass(frozen=True)
class Entry:
    name: str
    factory: Callable[..., Any]
    description: str


def _first_doc_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def spec_text(spec: str | Mapping[str, Any], skip: tuple[str, ...] = ()) -> str:
    """``name(key=value, ...)`` of a plug-in spec (a float as ``%g``), without the keys in ``skip``."""
    params = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = params.pop("name")
    args = ", ".join(f"{k}={f'{v:g}' if isinstance(v, float) else v}" for k, v in params.items() if k not in skip)
    return f"{name}({args})" if args else str(name)


_plugins_loaded = False


def load_plugins() -> None:
    """Import the built-in plug-ins and every installed third-party plug-in, once."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    importlib.import_module(BUILTIN_PLUGIN_MODULE)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        loaded = ep.load()
        if callable(loaded) and not inspect.ismodule(loaded) and not isinstance(loaded, type):
            loaded()


class Registry(Generic[T]):
    """A named collection of plug-in factories of one kind (``losses``, ``inheritance``, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    # -- registration -------------------------------------------------------------------
    def register(self, name: str | Callable[..., T] | None = None, *, description: str | None = None):
        """Decorator: ``@LOSSES.register`` or ``@LOSSES.register("affinity")``."""

        def decorate(factory: Callable[..., T]) -> Callable[..., T]:
            key = name if isinstance(name, str) else getattr(factory, "__name__", None)
            if not key:
                raise RegistryError(f"cannot infer a {self.kind} name for {factory!r}")
            if key in self._entries:
                other = self._entries[key].factory
                raise RegistryError(
                    f"{self.kind} {key!r} is already registered "
                    f"(by {other.__module__}.{getattr(other, '__qualname__', other)})"
                )
            self._entries[key] = Entry(key, factory, description or _first_doc_line(factory))
            return factory

        if callable(name) and not isinstance(name, str):
            factory, name = name, None
            return decorate(factory)
        return decorate

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    # -- lookup -------------------------------------------------------------------------
    def names(self) -> list[str]:
        load_plugins()
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        load_plugins()
        return name in self._entries

    def get(self, name: str) -> Callable[..., T]:
        load_plugins()
        if name not in self._entries:
            known = sorted(self._entries)
            raise RegistryError(
                f"unknown {self.kind} {name!r}.{suggest(name, known)} Known {self.kind}: {', '.join(known)}"
            )
        return self._entries[name].factory

    # -- building -----------------------------------------------------------------------
    @staticmethod
    def split_spec(spec: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        """``"cosine"`` or ``{"name": "cosine", "warmup": 10}`` -> (name, params)."""
        if isinstance(spec, str):
            return spec, {}
        if isinstance(spec, Mapping):
            params = dict(spec)
            name = params.pop("name", None)
            if not isinstance(name, str):
                raise RegistryError(f"a plug-in spec needs a 'name' key, got {dict(spec)!r}")
            return name, params
        raise RegistryError(f"a plug-in spec is a name or a mapping with 'name', got {spec!r}")

    def signature(self, name: str) -> inspect.Signature:
        """The constructor's signature; a class that only inherits ``nn.Module.__init__``
        (``*args, **kwargs``) takes no parameters."""
        sig = inspect.signature(self.get(name))
        kinds = {p.kind for p in sig.parameters.values()}
        if kinds == {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}:
            return sig.replace(parameters=[])
        return sig

    def check_params(self, name: str, params: Mapping[str, Any], extra: tuple[str, ...] = ()) -> None:
        """Raise if ``params`` (plus the names in ``extra`` the caller will pass) do not fit
        the constructor's signature: an unknown parameter, or a required one that is missing."""
        sig = self.signature(name)
        accepted = {
            p.name: p
            for p in sig.parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }
        takes_var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        if not takes_var_kw:
            unknown = [k for k in params if k not in accepted]
            if unknown:
                options = [k for k in accepted if k not in extra]
                hints = "".join(suggest(k, options) for k in unknown)
                raise RegistryError(
                    f"{self.kind} {name!r} has no parameter {', '.join(map(repr, unknown))}.{hints} "
                    f"Its parameters: {', '.join(options) or '(none)'}"
                )
        missing = [
            k
            for k, p in accepted.items()
            if p.default is p.empty and k not in params and k not in extra
        ]
        if missing:
            raise RegistryError(f"{self.kind} {name!r} needs parameter(s) {', '.join(map(repr, missing))}")

    def accepts(self, name: str, param: str) -> bool:
        """Whether the constructor declares ``param`` by name (context is offered only then)."""
        return param in self.signature(name).parameters

    def build(
        self, spec: str | Mapping[str, Any], context: Mapping[str, Any] | None = None, **extra: Any
    ) -> T:
        """Build a plug-in from its spec.

        ``extra`` are arguments the engine always passes; ``context`` are values the engine
        offers (``total_steps``, ``base_value``) that reach the constructor only where it
        declares them and the spec did not set them."""
        name, params = self.split_spec(spec)
        offered = {
            k: v for k, v in (context or {}).items() if k not in params and self.accepts(name, k)
        }
        self.check_params(name, params, tuple(extra) + tuple(offered))
        return self.get(name)(**params, **offered, **extra)

    def validate(self, spec: str | Mapping[str, Any], context: Mapping[str, Any] | None = None) -> T:
        """Build the plug-in once to run its constructor's value checks (``target_sparsity: 1.5``,
        a negative lr), turning the ``ValueError`` / ``TypeError`` it raises into a
        :class:`RegistryError` naming the plug-in. Constructors must therefore be cheap and free
        of side effects: they check and store their parameters, they build no model."""
        name, _ = self.split_spec(spec)
        try:
            return self.build(spec, context)
        except RegistryError:
            raise
        except (ValueError, TypeError) as e:
            raise RegistryError(f"{self.kind} {name!r}: {e}") from None

    def resolved(self, spec: str | Mapping[str, Any], context: tuple[str, ...] = ()) -> dict[str, Any]:
        """``{"name": ..., **params}`` with every constructor default filled in, so that writing a
        default out and omitting it give the same dict (the run id hashes this). Parameters the
        engine offers as ``context`` are not filled: there the engine's value, not the default, applies."""
        name, params = self.split_spec(spec)
        out: dict[str, Any] = {"name": name}
        for p in self.signature(name).parameters.values():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is not p.empty:
                if p.name not in params and p.name not in context:
                    out[p.name] = p.default
        out.update(params)
        return out

    # -- tests --------------------------------------------------------------------------
    @contextlib.contextmanager
    def scoped(self) -> Iterator[Registry[T]]:
        """Registrations made inside the block are undone when it ends (for tests)."""
        load_plugins()
        saved = dict(self._entries)
        try:
            yield self
        finally:
            self._entries = saved

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"


LOSSES: Registry[Any] = Registry("losses")
INHERITANCE: Registry[Any] = Registry("inheritance")
SCHEDULES: Registry[Any] = Registry("schedules")

REGISTRIES: dict[str, Registry[Any]] = {"losses": LOSSES, "inheritance": INHERITANCE, "schedules": SCHEDULES}
