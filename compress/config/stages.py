"""Stages of a progressive run as data: the chain form, each stage's keys on top of the top level's.

TinyCLIP (Wu et al., ICCV 2023, §3.3) compresses in stages: each stage inherits from the
previous stage's student while the teacher stays. A stage is executed as an ordinary run of
its *resolved* config: the top-level config with the stage's keys on top and no ``stages``.

Sparsity targets are cumulative against the teacher's prunable parameters (vision tower +
text tower without the token embedding, TinyCLIP's count) of the towers the strategy prunes
(``inheritance.towers``: both by default; every stage with a target prunes the same towers). A
strategy prunes its own source, so stage k's strategy is given ``1 - (1 - q_k) / f``, where ``f``
is the fraction of the teacher's prunable parameters of those towers its source still has (1 for
the teacher; at run time the previous stage's achieved value, at validation its target).

Which strategy prunes to a target, and through which parameter, is the plug-ins' knowledge: the stages are
resolved with it by :mod:`compress.recipe.stages`.
"""

from __future__ import annotations

import copy
import dataclasses
import re
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


def stage_source(stage: StageConfig, index: int, names: set[str]) -> tuple[str, str]:
    """The stage's name (checked: a new one, letters, digits, '_', '.', '-') and its source; ``names`` gets it."""
    where = f"stages[{index}]"
    name = stage_name(stage, index)
    if not _NAME.match(name):
        raise ConfigError(f"{where}.name: {name!r} must be letters, digits, '_', '.' or '-'")
    if name in names:
        raise ConfigError(f"{where}.name: {name!r} is used by an earlier stage; stage names must differ")
    names.add(name)
    source = stage.source or ("teacher" if index == 0 else "previous")
    if source not in STAGE_SOURCES:
        raise ConfigError(f"{where}.source: {source!r} is not one of {', '.join(STAGE_SOURCES)}")
    if index == 0 and source == "previous":
        raise ConfigError(f"{where}.source: the first stage has no previous stage; use teacher")
    return name, source


def stage_data(top: dict[str, Any], stage: StageConfig, index: int) -> dict[str, Any]:
    """The stage's config as a dict: the top level (without ``stages``) with the stage's keys on top."""
    data = copy.deepcopy(top)
    data["stages"] = []
    if stage.inheritance is not None:
        data["inheritance"] = copy.deepcopy(stage.inheritance)
    if stage.losses is not None:
        data["losses"] = copy.deepcopy(stage.losses)
    if stage.schedules is not None:
        data["schedules"] = {**data["schedules"], **copy.deepcopy(stage.schedules)}
    if stage.student is not None:
        data["student"] = dataclasses.asdict(stage.student)
    if stage.steps is not None and "steps" in stage.train:
        raise ConfigError(f"stages[{index}]: steps and train.steps both given; give one")
    data["train"] = {**data["train"], **stage.train}
    if stage.steps is not None:
        data["train"]["steps"] = stage.steps
    return data

