"""What the engine supplies to plug-in constructors, and to which: the one place that knows it.

A loss or an inheritance strategy declares the names it needs in its class's ``context``
(:mod:`compress.plugins`); a schedule takes ``base_value`` / ``total_steps`` by parameter name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from compress.config.errors import ConfigError
from compress.config.schema import RunConfig
from compress.config.specs import split_loss
from compress.config.validate import loss_weight_keys
from compress.registry import Registry

if TYPE_CHECKING:
    from torch import nn

#: what the engine supplies to a plug-in constructor, by registry, and from what (``clip-compress list NAME`` shows
#: it): to a loss or an inheritance strategy that declares the name in its ``context``, to a schedule that takes it
#: as a parameter. A loss's values are known once the models exist (:func:`loss_context`; a new kind of
#: model-derived context is added there and here)
ENGINE_CONTEXT = {
    "losses": {"student_embed_dim": "the student's embedding size",
               "teacher_embed_dim": "the teacher's embedding size"},
    "inheritance": {"total_steps": "train.steps"},
    "schedules": {"base_value": "train.lr for schedules.lr, the loss's weight for schedules.weight/<loss>",
                  "total_steps": "train.steps"},
}
SCHEDULE_CONTEXT = tuple(ENGINE_CONTEXT["schedules"])
LOSS_CONTEXT = tuple(ENGINE_CONTEXT["losses"])
INHERITANCE_CONTEXT = tuple(ENGINE_CONTEXT["inheritance"])


def declared_context(registry: Registry[Any], spec: Any) -> tuple[str, ...]:
    """The context names the plug-in of ``spec`` declares (its class's ``context``; none for a plain factory)."""
    return tuple(getattr(registry.get(registry.split_spec(spec)[0]), "context", ()))


def offered(registry: Registry[Any], spec: Any, context: Mapping[str, Any]) -> dict[str, Any]:
    """The values of ``context`` that the plug-in of ``spec`` declares it needs."""
    return {k: context[k] for k in declared_context(registry, spec) if k in context}


def check_context(registry: Registry[Any], spec: Any, where: str, supplied: tuple[str, ...]) -> None:
    """A declared context name must be one the engine supplies and one the constructor takes."""
    name = registry.split_spec(spec)[0]
    for key in declared_context(registry, spec):
        if key not in supplied:
            raise ConfigError(f"{where}: {registry.kind} {name!r} declares context {key!r}, which the engine does not "
                              f"supply (it supplies: {', '.join(supplied)})")
        if not registry.accepts(name, key):
            raise ConfigError(f"{where}: {registry.kind} {name!r} declares context {key!r}, but its constructor takes "
                              "no such parameter")


def loss_context(student: nn.Module, teacher: nn.Module | None) -> dict[str, Any]:
    """The model-derived values a loss may declare (:data:`LOSS_CONTEXT`): the embedding sizes."""
    from compress.models.forward import embed_dim

    context = {"student_embed_dim": embed_dim(student)}
    if teacher is not None:
        context["teacher_embed_dim"] = embed_dim(teacher)
    return context


def inheritance_context(cfg: RunConfig) -> dict[str, Any]:
    """What the engine offers an inheritance constructor (``total_steps``: ``train.steps``)."""
    return {"total_steps": cfg.train.steps}


def schedule_context(cfg: RunConfig, key: str) -> dict[str, Any]:
    """What the engine offers the constructor of ``schedules.<key>``: ``total_steps`` (``train.steps``)
    and ``base_value``: ``train.lr`` for ``lr``, the loss's configured ``weight`` for ``weight/<loss>``."""
    context: dict[str, Any] = {"total_steps": cfg.train.steps}
    if key == "lr":
        context["base_value"] = cfg.train.lr
    elif key in (weight_keys := loss_weight_keys(cfg.losses)):
        context["base_value"] = float(split_loss(cfg.losses[weight_keys[key]])[1])
    return context
