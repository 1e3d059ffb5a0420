"""Stages of a progressive run: the chain form, and each stage resolved to a plain run config.

TinyCLIP (Wu et al., ICCV 2023, §3.3) compresses in stages: each stage inherits from the
previous stage's student while the teacher stays. A stage is executed as an ordinary run of
its *resolved* config: the top-level config with the stage's keys on top and no ``stages``.

Sparsity targets are cumulative against the teacher's prunable parameters (vision tower +
text tower without the token embedding, TinyCLIP's count) of the towers the strategy prunes
(``inheritance.towers``: both by default; every stage with a target prunes the same towers). A
strategy prunes its own source, so stage k's strategy is given ``1 - (1 - q_k) / f``, where ``f``
is the fraction of the teacher's prunable parameters of those towers its source still has (1 for
the teacher; at run time the previous stage's achieved value, at validation its target).
"""

from __future__ import annotations

import copy
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from compress.config.errors import ConfigError
from compress.config.schema import STAGE_SOURCES, RunConfig, StageConfig

#: the keys of the one-line chain form ``stages: {targets: [...], steps: N}``
CHAIN_KEYS = ("targets", "steps", "names")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def expand_stage_chain(stages: Any) -> Any:
    """``{targets: [0.25, 0.5, 0.75], steps: N}`` -> one stage per cumulative target, each
    ``steps`` long (default ``train.steps``), named ``sparsity25`` ... (or ``names``); a list
    of stages is returned unchanged."""
    if not isinstance(stages, Mapping):
        return stages
    unknown = sorted(set(stages) - set(CHAIN_KEYS))
    if unknown:
        raise ConfigError(f"stages: unknown key(s) {unknown} of the chain form; valid: {', '.join(CHAIN_KEYS)}")
    targets = stages.get("targets")
    if not isinstance(targets, list) or not targets:
        raise ConfigError("stages.targets: a non-empty list of cumulative target sparsities, e.g. [0.25, 0.5, 0.75]")
    names = stages.get("names")
    if names is not None and (not isinstance(names, list) or len(names) != len(targets)):
        raise ConfigError(f"stages.names: one name per target ({len(targets)}), got {names!r}")
    out = []
    for i, target in enumerate(targets):
        if isinstance(target, bool) or not isinstance(target, int | float):
            raise ConfigError(f"stages.targets[{i}]: expected a number, got {target!r}")
        stage: dict[str, Any] = {
            "name": names[i] if names else f"sparsity{round(100 * target):d}",
            "target_sparsity": float(target),
        }
        if stages.get("steps") is not None:
            stage["steps"] = stages["steps"]
        out.append(stage)
    return out


@dataclass
class ResolvedStage:
    """Stage ``index`` of a run: its name, source, cumulative target and the config it runs."""

    index: int
    name: str
    source: str
    target_sparsity: float | None
    cfg: RunConfig

    @property
    def dir_name(self) -> str:
        return f"{self.index}-{self.name}"


def stage_name(stage: StageConfig, index: int) -> str:
    return stage.name if stage.name is not None else f"stage{index}"


def per_stage_target(cumulative: float, source_fraction: float) -> float:
    """The fraction of its source a stage must remove so that ``cumulative`` of the teacher's
    prunable parameters are gone: ``1 - (1 - q) / f`` (``f``: the source's kept fraction)."""
    return 1.0 - (1.0 - cumulative) / source_fraction


def resolve_stages(cfg: RunConfig) -> list[ResolvedStage]:
    """Each stage's config (validated), in order; ``[]`` for a run without stages. The per-stage
    target of automatic inheritance assumes every earlier stage reaches its cumulative target;
    :func:`with_source_fraction` corrects it at run time with the achieved value."""
    from compress.config.parsing import _from_dict
    from compress.config.validate import validate

    if not cfg.stages:
        return []
    top = cfg.to_dict()
    top["stages"] = []
    resolved: list[ResolvedStage] = []
    names: set[str] = set()
    previous_target = 0.0
    pruned: tuple[int, tuple[str, ...]] | None = None  # the first stage with a target, and its towers
    for k, stage in enumerate(cfg.stages):
        where = f"stages[{k}]"
        name = stage_name(stage, k)
        if not _NAME.match(name):
            raise ConfigError(f"{where}.name: {name!r} must be letters, digits, '_', '.' or '-'")
        if name in names:
            raise ConfigError(f"{where}.name: {name!r} is used by an earlier stage; stage names must differ")
        names.add(name)
        source = stage.source or ("teacher" if k == 0 else "previous")
        if source not in STAGE_SOURCES:
            raise ConfigError(f"{where}.source: {source!r} is not one of {', '.join(STAGE_SOURCES)}")
        if k == 0 and source == "previous":
            raise ConfigError(f"{where}.source: the first stage has no previous stage; use teacher")
        data = copy.deepcopy(top)
        if stage.inheritance is not None:
            data["inheritance"] = copy.deepcopy(stage.inheritance)
        if stage.losses is not None:
            data["losses"] = copy.deepcopy(stage.losses)
        if stage.schedules is not None:
            data["schedules"] = {**data["schedules"], **copy.deepcopy(stage.schedules)}
        if stage.student is not None:
            data["student"] = _plain(stage.student)
        if stage.steps is not None and "steps" in stage.train:
            raise ConfigError(f"{where}: steps and train.steps both given; give one")
        data["train"] = {**data["train"], **stage.train}
        if stage.steps is not None:
            data["train"]["steps"] = stage.steps
        target = stage.target_sparsity
        if target is not None:
            _check_target(where, target, previous_target if source == "previous" else 0.0, data["inheritance"])
            fraction = 1.0 - previous_target if source == "previous" else 1.0
            data["inheritance"] = {**_spec(data["inheritance"]),
                                   _target_parameter(data["inheritance"]): per_stage_target(target, fraction)}
        else:
            _refuse_missing_target(where, data["inheritance"])
        try:
            stage_cfg = validate(_from_dict(RunConfig, data))
        except ConfigError as e:
            raise ConfigError(f"{where} ({name}): {e}") from None
        if target is not None:
            towers = pruned_towers(stage_cfg)
            if pruned is not None and set(towers) != set(pruned[1]):
                raise ConfigError(
                    f"{where}.inheritance.towers: this stage prunes {'+'.join(towers)}, stage {pruned[0]} "
                    f"{'+'.join(pruned[1])}; cumulative targets are fractions of the same towers' parameters"
                )
            pruned = (k, towers)
        resolved.append(ResolvedStage(k, name, source, target, stage_cfg))
        previous_target = target if target is not None else previous_target
    return resolved


def pruned_towers(cfg: RunConfig) -> tuple[str, ...]:
    """The towers the config's inheritance strategy prunes, those its target is a fraction of
    (the strategy's ``towers``)."""
    from compress.config.validate import build_inheritance

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
    cfg.inheritance = {**_spec(cfg.inheritance), _target_parameter(cfg.inheritance): per_stage}
    return cfg


def _spec(spec: Any) -> dict[str, Any]:
    return {"name": spec} if isinstance(spec, str) else dict(spec)


def _plain(value: Any) -> Any:
    import dataclasses

    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _target_parameter(spec: Any) -> str | None:
    """The constructor parameter that sets the strategy's target (its declared ``target_parameter``), or None."""
    from compress.registry import INHERITANCE

    name = _spec(spec).get("name")
    if not (isinstance(name, str) and name in INHERITANCE):
        return None
    return getattr(INHERITANCE.get(name), "target_parameter", None)


def _check_target(where: str, target: float, floor: float, inheritance: Any) -> None:
    if isinstance(target, bool) or not floor < target < 1.0:
        raise ConfigError(
            f"{where}.target_sparsity: a cumulative target must be in ({floor:g}, 1) (above the source's), "
            f"got {target}"
        )
    parameter = _target_parameter(inheritance)
    if parameter is None:
        raise ConfigError(
            f"{where}.target_sparsity: inheritance {_spec(inheritance).get('name')!r} takes no target sparsity; "
            "give the stage a student (manual) or use inheritance auto"
        )
    if parameter in _spec(inheritance):
        raise ConfigError(
            f"{where}: inheritance.{parameter} is set, but in a staged run the target is the stage's "
            f"cumulative target_sparsity; remove inheritance.{parameter}"
        )


def _refuse_missing_target(where: str, inheritance: Any) -> None:
    if _target_parameter(inheritance) is not None:
        raise ConfigError(
            f"{where}.target_sparsity: inheritance {_spec(inheritance).get('name')!r} prunes to a target; in a "
            "staged run give each such stage its cumulative target_sparsity"
        )
