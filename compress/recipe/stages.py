"""Stages resolved with the plug-ins' knowledge: each stage's config validated, its strategy's target set.

TinyCLIP (Wu et al., ICCV 2023, §3.3) compresses in stages: each stage inherits from the previous stage's
student while the teacher stays. A stage runs as an ordinary run of its *resolved* config (the top-level
config with the stage's keys on top, :func:`compress.config.stages.stage_data`). A stage's cumulative
``target_sparsity`` q_k goes to the constructor parameter its strategy declares
(:attr:`compress.plugins.Inheritance.target_parameter`) as its own share ``1 - (1 - q_k) / f``
(:func:`~compress.config.stages.per_stage_target`; ``f``: the fraction of the teacher's prunable parameters,
of the towers the strategy prunes, that its source keeps: 1 for the teacher; at run time the previous stage's
achieved value, at validation its target).
"""

from __future__ import annotations

import copy
import sys
from typing import Any

from compress.config.errors import ConfigError
from compress.config.parsing import from_dict
from compress.config.schema import RunConfig
from compress.config.specs import plain_spec
from compress.config.stages import ResolvedStage, per_stage_target, stage_data, stage_source
from compress.recipe.build import build_inheritance
from compress.recipe.checks import validate_one
from compress.recipe.context import check_target_declared
from compress.registry import INHERITANCE


def resolve_stages(cfg: RunConfig) -> list[ResolvedStage]:
    """Each stage's config (validated), in order; ``[]`` for a run without stages. The per-stage target
    assumes every earlier stage reaches its cumulative target; :func:`with_source_fraction` corrects it at
    run time with the achieved value."""
    if not cfg.stages:
        return []
    top = cfg.to_dict()
    resolved: list[ResolvedStage] = []
    names: set[str] = set()
    previous_target = 0.0
    pruned: tuple[int, tuple[str, ...]] | None = None  # the first stage with a target, and its towers
    for k, stage in enumerate(cfg.stages):
        where = f"stages[{k}]"
        name, source = stage_source(stage, k, names)
        data = stage_data(top, stage, k)
        if source == "previous":
            _refuse_source_bound(where, data["inheritance"])
        target = stage.target_sparsity
        if target is not None:
            _check_target(where, target, previous_target if source == "previous" else 0.0, data["inheritance"])
            fraction = 1.0 - previous_target if source == "previous" else 1.0
            data["inheritance"] = {**plain_spec(data["inheritance"]),
                                   target_parameter(data["inheritance"]): per_stage_target(target, fraction)}
        else:
            _refuse_missing_target(where, data["inheritance"])
        try:
            stage_cfg = validate_one(from_dict(RunConfig, data))
        except ConfigError as e:
            raise ConfigError(f"{where} ({name}): {e}") from None
        if target is not None:
            pruned = _same_towers(where, k, stage_cfg, pruned)
        resolved.append(ResolvedStage(k, name, source, target, stage_cfg))
        previous_target = target if target is not None else previous_target
    return resolved


def _same_towers(where: str, k: int, cfg: RunConfig,
                 pruned: tuple[int, tuple[str, ...]] | None) -> tuple[int, tuple[str, ...]]:
    """Every stage with a target prunes the towers of the first such stage (its target is a fraction of them)."""
    towers = pruned_towers(cfg)
    if pruned is not None and set(towers) != set(pruned[1]):
        raise ConfigError(
            f"{where}.inheritance.towers: this stage prunes {'+'.join(towers)}, stage {pruned[0]} "
            f"{'+'.join(pruned[1])}; cumulative targets are fractions of the same towers' parameters"
        )
    return pruned if pruned is not None else (k, towers)


def pruned_towers(cfg: RunConfig) -> tuple[str, ...]:
    """The towers the config's inheritance strategy prunes, those its target is a fraction of
    (the strategy's ``towers``)."""
    return tuple(build_inheritance(cfg).towers)


def with_source_fraction(stage: ResolvedStage, source_fraction: float) -> RunConfig:
    """The stage's config with its strategy's target recomputed for a source that keeps
    ``source_fraction`` of the teacher's prunable parameters (the previous stage's actual size).
    A source already smaller than the stage's cumulative target gets a per-stage target of 0
    (the stage distils without pruning further; the run says so on stderr)."""
    if stage.target_sparsity is None:
        return stage.cfg
    per_stage = per_stage_target(stage.target_sparsity, source_fraction)
    if per_stage < 0.0:
        print(
            f"clip-compress: warning: stage {stage.dir_name}: its source keeps {source_fraction:.1%} of the "
            f"teacher's prunable parameters, already below the cumulative target's {1 - stage.target_sparsity:.1%}; "
            "it prunes nothing more",
            file=sys.stderr,
        )
        per_stage = 0.0
    cfg = copy.deepcopy(stage.cfg)
    cfg.inheritance = {**plain_spec(cfg.inheritance), target_parameter(cfg.inheritance): per_stage}
    return cfg


def target_parameter(spec: Any) -> str | None:
    """The constructor parameter that sets the strategy's target (its declared ``target_parameter``), or None."""
    name = plain_spec(spec).get("name")
    if not (isinstance(name, str) and name in INHERITANCE):
        return None
    return getattr(INHERITANCE.get(name), "target_parameter", None)


def _check_target(where: str, target: float, floor: float, inheritance: Any) -> None:
    if isinstance(target, bool) or not floor < target < 1.0:
        raise ConfigError(
            f"{where}.target_sparsity: a cumulative target must be in ({floor:g}, 1) (above the source's), "
            f"got {target}"
        )
    parameter = target_parameter(inheritance)
    if parameter is None:
        check_target_declared(inheritance, f"{where}.inheritance")
        raise ConfigError(
            f"{where}.target_sparsity: inheritance {plain_spec(inheritance).get('name')!r} takes no target sparsity; "
            "give the stage a student (manual) or use inheritance auto"
        )
    if parameter in plain_spec(inheritance):
        raise ConfigError(
            f"{where}: inheritance.{parameter} is set, but in a staged run the target is the stage's "
            f"cumulative target_sparsity; remove inheritance.{parameter}"
        )


def _refuse_source_bound(where: str, inheritance: Any) -> None:
    """A stage sourced from the previous stage's student cannot set what the strategy binds to one source model
    (:attr:`compress.plugins.Inheritance.source_bound`): that model is made by the run itself."""
    spec = plain_spec(inheritance)
    name = spec.get("name")
    if not (isinstance(name, str) and name in INHERITANCE):
        return
    bound = [p for p in getattr(INHERITANCE.get(name), "source_bound", ()) if spec.get(p) is not None]
    if bound:
        raise ConfigError(
            f"{where}.inheritance.{bound[0]}: this stage's source is the previous stage's student, made by this run; "
            f"inheritance {name!r} binds {', '.join(bound)} to one source model: unset it for this stage "
            "(or give the stage source: teacher)"
        )


def _refuse_missing_target(where: str, inheritance: Any) -> None:
    if target_parameter(inheritance) is not None:
        raise ConfigError(
            f"{where}.target_sparsity: inheritance {plain_spec(inheritance).get('name')!r} prunes to a target; in a "
            "staged run give each such stage its cumulative target_sparsity"
        )
