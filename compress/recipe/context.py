"""What the engine supplies to plug-in constructors, and to which: the one place that knows it.

A loss or an inheritance strategy declares the names it needs in its class's ``context``
(:mod:`compress.plugins`); a schedule takes ``base_value`` / ``total_steps`` by parameter name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from compress.config.errors import ConfigError
from compress.config.schema import RunConfig
from compress.config.specs import plain_spec, split_loss
from compress.config.validate import loss_weight_keys
from compress.registry import INHERITANCE, SCHEDULES, Registry

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
                  "total_steps": "train.steps",
                  "weight_of": "for schedules.weight/<loss>: another term's weight per step by its key "
                               "(weight_of('weight/affinity')(t): its schedule, else its written weight)"},
}
#: the constructor parameter that, by its name, says an inheritance strategy prunes to a target (the class must then
#: declare it: :attr:`compress.plugins.Inheritance.target_parameter`)
TARGET = "target_sparsity"
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
    """A declared context name must be one the engine supplies and one the constructor takes; a constructor
    parameter named like a value the engine supplies must be declared (undeclared, it would silently get its
    default where plug-ins written before declarations got the engine's value)."""
    name, params = registry.split_spec(spec)
    declared = declared_context(registry, spec)
    # a value the config sets itself is the constructor's either way (the engine never overrode a written value)
    undeclared = [key for key in supplied if key not in declared and key not in params and registry.accepts(name, key)]
    if undeclared:
        raise ConfigError(f"{where}: {registry.kind} {name!r} takes {', '.join(undeclared)}, which the engine supplies "
                          f"only to a plug-in that declares it: add context = {(*declared, *undeclared)!r} to its "
                          "class (or as an attribute of its factory function)")
    for key in declared:
        if key not in supplied:
            raise ConfigError(f"{where}: {registry.kind} {name!r} declares context {key!r}, which the engine does not "
                              f"supply (it supplies: {', '.join(supplied)})")
        if not registry.accepts(name, key):
            raise ConfigError(f"{where}: {registry.kind} {name!r} declares context {key!r}, but its constructor takes "
                              "no such parameter")


def check_target_declared(spec: Any, where: str) -> None:
    """An inheritance constructor taking ``target_sparsity`` must declare it as its ``target_parameter``: the engine
    reads a strategy's target (``sparsity/target``, ``sparsity/missed``, the plan, a stage's share) only so."""
    name = plain_spec(spec).get("name")
    if not (isinstance(name, str) and name in INHERITANCE and INHERITANCE.accepts(name, TARGET)):
        return
    if getattr(INHERITANCE.get(name), "target_parameter", None) is None:
        raise ConfigError(f"{where}: inheritance {name!r} takes {TARGET}, but its class declares no target_parameter, "
                          f"so the engine would not read its target: add target_parameter = {TARGET!r} to its class")


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


def schedule_context(cfg: RunConfig, key: str, chain: tuple[int, ...] = ()) -> dict[str, Any]:
    """What the engine offers the constructor of ``schedules.<key>``: ``total_steps`` (``train.steps``)
    and ``base_value``: ``train.lr`` for ``lr``, the loss's configured ``weight`` for ``weight/<loss>``; to a weight
    schedule also ``weight_of``: another loss term's weight per step (the ``complement`` schedule's lambda, MobileCLIP's
    mix). ``chain``: the terms whose weight schedules are being built, each waiting on the next (a cycle is refused)."""
    context: dict[str, Any] = {"total_steps": cfg.train.steps}
    if key == "lr":
        context["base_value"] = cfg.train.lr
    elif key in (weight_keys := loss_weight_keys(cfg.losses)):
        context["base_value"] = float(split_loss(cfg.losses[weight_keys[key]])[1])
        context["weight_of"] = lambda other: weight_of(cfg, other, (*chain, weight_keys[key]))
    return context


def weight_of(cfg: RunConfig, key: str, chain: tuple[int, ...]) -> Callable[[int], float]:
    """The weight at each step of the loss term that the ``schedules`` key ``key`` names: its schedule, built with
    its own context, or its written weight when it has none. Raises ``ValueError`` for a key that names no term,
    and for a term whose weight would depend on itself (``chain``: the terms already waiting on this one)."""
    weight_keys = loss_weight_keys(cfg.losses)
    if key not in weight_keys:
        names = [k for k in weight_keys if not k.split("/", 1)[1].isdigit()]
        raise ValueError(f"of: {key!r} names no loss term's weight (valid: {', '.join(names + ['weight/<index>'])})")
    index = weight_keys[key]
    if index in chain:
        raise ValueError(f"of: {key!r} is losses[{index}]'s weight, which waits on this schedule itself (a cycle)")
    scheduled = [k for k in cfg.schedules if weight_keys.get(k) == index]
    if not scheduled:
        weight = float(split_loss(cfg.losses[index])[1])
        return lambda step: weight
    return SCHEDULES.build(cfg.schedules[scheduled[0]], context=schedule_context(cfg, scheduled[0], chain))
