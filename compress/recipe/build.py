"""Builders: a config's plug-ins as objects, each with the context it declares (:mod:`compress.recipe.context`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from compress.config.schema import RunConfig
from compress.config.specs import split_loss
from compress.config.validate import loss_weight_keys
from compress.recipe.context import inheritance_context, loss_context, offered, schedule_context, teacher_count
from compress.registry import INHERITANCE, LOSSES, SCHEDULES

if TYPE_CHECKING:
    from torch import nn


def build_inheritance(cfg: RunConfig) -> Any:
    """The config's inheritance strategy, built with the context it declares."""
    return INHERITANCE.build(cfg.inheritance, context=offered(INHERITANCE, cfg.inheritance, inheritance_context(cfg)))


def build_schedule(cfg: RunConfig, key: str) -> Any:
    """``schedules.<key>`` built with its base value and ``total_steps``."""
    return SCHEDULES.build(cfg.schedules[key], context=schedule_context(cfg, key))


def build_losses(cfg: RunConfig, student: nn.Module, teacher: nn.Module | None) -> list[Any]:
    """The loss terms with their weights, and the weight schedules (``schedules.weight/<loss>``); each loss gets
    the context it declares (``student_embed_dim``, ``teacher_embed_dim``: the first teacher's, ``teacher_count``)."""
    from compress.train import LossTerm

    context = loss_context(student, teacher, max(teacher_count(cfg), 1))
    schedule_of = {i: key for key, i in loss_weight_keys(cfg.losses).items() if key in cfg.schedules}
    terms = []
    for i, spec in enumerate(cfg.losses):
        params, weight = split_loss(spec)
        schedule = build_schedule(cfg, schedule_of[i]) if i in schedule_of else None
        loss = LOSSES.build(params, context=offered(LOSSES, params, context))
        terms.append(LossTerm(params["name"], float(weight), loss, schedule))
    return terms


def loss_similarity_matrices(cfg: RunConfig) -> list[int]:
    """The similarity matrices each configured loss computes per step (its class's ``similarity_matrices``, half of
    them the teacher's: a loss that reads a teacher ensemble computes that half once per teacher)."""
    counts = []
    for spec in cfg.losses:
        loss = LOSSES.get(LOSSES.split_spec(spec)[0])
        count = int(getattr(loss, "similarity_matrices", 0))
        if getattr(loss, "reads_ensemble", False) and teacher_count(cfg) > 1:
            count += (teacher_count(cfg) - 1) * (count // 2)
        counts.append(count)
    return counts
