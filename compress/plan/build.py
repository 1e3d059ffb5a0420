"""The plan of a run as data (``clip-compress run CONFIG --dry-run``; :mod:`compress.plan.text` prints it).

:func:`build_plan` turns a validated config's Recipe (:mod:`compress.recipe`) into a :class:`Plan`: per
stage its source, inheritance, student with its parameters (TinyCLIP's count: vision tower / text tower
without the token embedding) and MACs per image and per text, steps, samples seen, losses, schedules, and
what running the command would do in the run directory (start, resume from a checkpoint, skip a completed
run). Nothing is trained, downloaded or written: models are built from their architecture on the ``meta``
device (no memory, no initialisation) with random weights standing in for pretrained tags and weight
files; only a local exported folder is read from disk.

For a strategy that derives the student from its source (automatic inheritance) the student's size is
decided by training: the plan gives the strategy's own text of it, the cumulative target q and the expected
parameter count at the target, (1 - q) x the teacher's prunable parameters (of the pruned towers) + the rest
(TinyCLIP §3.3; targets are cumulative, see :mod:`compress.recipe.stages`).
"""


from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.config import ConfigError, RunConfig
from compress.config.specs import split_loss
from compress.config.stages import ResolvedStage
from compress.config.validate import loss_weight_keys
from compress.memory import (
    REFERENCE_GPU_BYTES,
    HostEstimate,
    MemoryEstimate,
    estimate_device_memory,
    estimate_host_memory,
    gib,
    world_size_of,
)
from compress.plan.cache import cache_lines
from compress.plan.facts import ModelFacts, model_facts
from compress.plan.state import missing_paths, run_state, stage_state
from compress.recipe import Recipe, schedule_context, with_source_fraction
from compress.registry import spec_text
from compress.rundir import stage_dir

log = logging.getLogger(__name__)


@dataclass
class StagePlan:
    """One stage (a run without stages is one stage, index 0)."""

    index: int
    name: str
    source: str
    source_text: str
    inheritance: str
    student: ModelFacts | None
    student_text: str
    target_sparsity: float | None
    stage_target: float | None
    expected_prunable: int | None
    expected_total: int | None
    steps: int
    batch_size: int
    accum_steps: int
    samples: int
    epochs: float | None
    losses: list[str]
    schedules: list[str]
    directory: Path
    state: str
    #: the towers the target is a fraction of (those the strategy prunes)
    towers: tuple[str, ...] = ("vision", "text")
    #: what decides how a derived student splits its size (:attr:`compress.plugins.Inheritance.structure_decided_by`)
    structure_decided_by: str = "training"
    #: memory of one step per process (None: a model's size is unknown), and what the estimate assumed
    memory: MemoryEstimate | None = None
    host: HostEstimate | None = None
    world_size: int = 1
    #: samples per process in one micro-batch (``TrainConfig.micro_batch``)
    micro_batch: int = 0
    grad_checkpointing: bool = False
    memory_note: str = ""


@dataclass
class Plan:
    """What ``clip-compress run CONFIG`` would do."""

    name: str
    run_id: str
    run_dir: Path
    teacher: ModelFacts | None
    stages: list[StagePlan]
    state: str
    staged: bool
    warnings: list[str] = field(default_factory=list)
    #: a teacher ensemble's further members (``teachers[1:]``; ``teacher`` is ``teachers[0]``)
    members: list[ModelFacts] = field(default_factory=list)
    #: the teacher-output cache: where, how far written, its size, what it saves (:mod:`compress.plan.cache`)
    cache: list[str] = field(default_factory=list)


def _losses(cfg: RunConfig) -> list[str]:
    out = []
    for spec in cfg.losses:
        params, weight = split_loss(spec)
        out.append(f"{spec_text(params)} x {float(weight):g}")
    return out


def _schedules(cfg: RunConfig, inheritance: Any) -> list[str]:
    """Each schedule with its base value and its values at the first, middle and last step."""
    steps = cfg.train.steps
    replaced = inheritance.replacement_step()
    weight_keys = loss_weight_keys(cfg.losses)
    out = []
    for key, spec in cfg.schedules.items():
        context = schedule_context(cfg, key)
        schedule = Recipe.schedule(cfg, key)
        # the lr after the strategy replaced the student is the strategy's (its schedule lines say which)
        points = sorted({0, replaced} if key == "lr" and replaced is not None else {0, steps // 2, steps - 1})
        values = ", ".join(f"step {s}: {schedule.value(s):.3g}" for s in points)
        base = f", base {context['base_value']:g}" if "base_value" in context else ""
        what = f" (losses[{weight_keys[key]}])" if key != "lr" else ""
        out.append(f"{key}{what}: {spec_text(spec)}{base}; {values}")
    return out + inheritance.schedule_lines(steps)


def _source_text(stage: ResolvedStage, inheritance: Any, teacher: ModelFacts | None,
                 previous: StagePlan | None) -> str:
    if not inheritance.needs_source:
        return "none: random initialisation (the source is not read)"
    if stage.source == "teacher":
        return f"the teacher ({teacher.label})" if teacher is not None else "the teacher"
    return f"stage {previous.index} ({previous.name})'s exported student" if previous else "previous"


def _student(stage: ResolvedStage, staged: bool, inheritance: Any, source_text: str, target: float | None,
             teacher: ModelFacts | None, warnings: list[str]) -> tuple[ModelFacts | None, str, int | None, int | None]:
    """The stage's student: its facts and label (a configured architecture), or the strategy's own text and the
    expected size at the target (a student the strategy derives from its source: (1 - q) x the teacher's
    prunable parameters of the pruned towers + the rest)."""
    cfg = stage.cfg
    if inheritance.needs_student_config:
        if cfg.student is None:
            return None, "(none)", None, None
        student = model_facts(cfg.student, f"stages[{stage.index}].student" if staged else "student", warnings)
        return student, student.label, None, None
    text = inheritance.describe_student("the teacher" if stage.source == "teacher" else source_text)
    if target is None or teacher is None or teacher.prunable is None:
        return None, text, None, None
    masked = sum(getattr(teacher, t) for t in inheritance.towers)  # the target's towers
    expected_prunable = round((1.0 - target) * masked) + teacher.prunable - masked
    return None, text, expected_prunable, expected_prunable + teacher.total - teacher.prunable


def _stage_plan(stage: ResolvedStage, recipe: Recipe, teacher: ModelFacts | None, previous: StagePlan | None,
                run_dir: Path, force: bool, warnings: list[str], members: list[ModelFacts]) -> StagePlan:
    cfg, staged = stage.cfg, recipe.staged
    directory = stage_dir(run_dir, stage.dir_name if staged else None)
    inheritance = Recipe.inheritance(cfg)
    stage_target = inheritance.pruning_target()
    target = stage.target_sparsity if stage.target_sparsity is not None else stage_target
    source_text = _source_text(stage, inheritance, teacher, previous)
    student, student_text, expected_prunable, expected_total = _student(stage, staged, inheritance, source_text,
                                                                        target, teacher, warnings)
    samples, available = cfg.train.steps * cfg.train.batch_size, cfg.data.train.num_samples
    parameter = inheritance.target_parameter
    plan = StagePlan(
        index=stage.index,
        name=stage.name,
        source=stage.source,
        source_text=source_text,
        inheritance=spec_text(cfg.inheritance, skip=(parameter,) if parameter else ()),
        student=student,
        student_text=student_text,
        target_sparsity=target,
        stage_target=stage_target,
        expected_prunable=expected_prunable,
        expected_total=expected_total,
        structure_decided_by=inheritance.structure_decided_by,
        steps=cfg.train.steps,
        batch_size=cfg.train.batch_size,
        accum_steps=cfg.train.accum_steps,
        samples=samples,
        epochs=samples / available if available else None,
        losses=_losses(cfg),
        schedules=_schedules(cfg, inheritance),
        directory=directory,
        state=stage_state(directory, recipe, force, staged, warnings),
        towers=tuple(inheritance.towers),
        world_size=world_size_of(cfg),
        micro_batch=cfg.train.micro_batch(world_size_of(cfg)),
        grad_checkpointing=cfg.train.grad_checkpointing,
    )
    _add_memory(plan, cfg, teacher, previous, warnings, members)
    return plan


def check_inheritances(cfg: RunConfig, teacher: ModelFacts | None = None, recipe: Recipe | None = None) -> None:
    """Every stage's student against its source (:func:`check_inheritance`): the teacher, or the previous stage's
    student (not checked after a stage that learns its structure). The dry run and the run before it starts
    (:func:`experiments.dispatch.check_before_run`) both ask it; ``teacher``: its facts when known already."""
    recipe = recipe or Recipe.of(cfg)
    warnings: list[str] = []  # a missing file: not checked here, the plan warns
    if teacher is None and cfg.teacher is not None:
        teacher = model_facts(cfg.teacher, "teacher", warnings)
    previous: ModelFacts | None = None
    for stage in recipe.stages:
        inheritance = Recipe.inheritance(stage.cfg)
        student = None
        if inheritance.needs_student_config and stage.cfg.student is not None:
            where = f"stages[{stage.index}].student" if recipe.staged else "student"
            student = model_facts(stage.cfg.student, where, warnings)
            check_inheritance(inheritance, student, teacher if stage.source == "teacher" else previous, where)
        elif not inheritance.needs_student_config and stage.source == "teacher":  # derived from the teacher alone
            check_inheritance(inheritance, None, teacher,
                              f"stages[{stage.index}].inheritance" if recipe.staged else "inheritance")
        elif (not inheritance.needs_student_config and inheritance.bounded_by_teacher
              and stage.target_sparsity is not None):  # from the previous stage: its cumulative target, one go
            check_inheritance(Recipe.inheritance(with_source_fraction(stage, 1.0)), None, teacher,
                              f"stages[{stage.index}].inheritance (its cumulative target, from the teacher)")
        previous = student


def check_inheritance(inheritance: Any, student: ModelFacts | None, source: ModelFacts | None, where: str) -> None:
    """The run's own check of the student against its source (:meth:`compress.plugins.Inheritance.check`: manual
    inheritance refuses a student larger than its source), on shape-only models; a :class:`ConfigError` naming
    the student's key. A source of unknown shape (a missing file, a stage that learns its structure) is not
    checked; a strategy that derives its student (no student config) is checked against its source alone
    (``check(None, source)``: importance inheritance refuses more layers dropped than the source has)."""
    if source is None or source.build is None or (student is None) == inheritance.needs_student_config:
        return
    if student is not None and student.build is None:
        return
    try:
        shapes = student.build() if student is not None else None, source.build()
    except Exception as error:  # an op without a meta kernel in this torch: the run checks it as it starts
        log.debug("plan: building %s or its source on the meta device failed (%s): not checked", where, error)
        return
    try:
        inheritance.check(*shapes)
    except ValueError as error:
        raise ConfigError(f"{where}: {error}") from None


def _add_memory(plan: StagePlan, cfg: RunConfig, teacher: ModelFacts | None, previous: StagePlan | None,
                warnings: list[str], members: list[ModelFacts]) -> None:
    """The stage's memory estimate (:mod:`compress.memory`). A student that learns its structure is a
    masked copy of its source: the teacher's shape, or the previous stage's; a previous stage that
    learned its own has no shape before training, and the teacher's stands in (an upper bound)."""
    student = plan.student.shape if plan.student is not None else None
    if plan.student is None and teacher is not None:
        student = teacher.shape
        if plan.source == "previous" and previous is not None:
            if previous.student is not None:
                student = previous.student.shape
            else:
                plan.memory_note = "student at the teacher's shape: an upper bound, its source is smaller"
    if student is None:
        return
    teacher_shape: Any = teacher.shape if teacher is not None else None
    if members and teacher_shape is not None:  # an ensemble: every member's weights, features and view
        shapes = [teacher_shape, *(m.shape for m in members)]
        if all(shape is not None for shape in shapes):
            teacher_shape = shapes
        else:
            plan.memory_note = "the ensemble's members are not counted: one's size is unknown"
    plan.memory = estimate_device_memory(cfg, student, teacher_shape)
    plan.host = estimate_host_memory(cfg, student, teacher_shape)
    if plan.memory.total > REFERENCE_GPU_BYTES:
        parts = plan.memory.parts()
        largest = max(parts, key=lambda k: parts[k])
        warnings.append(f"{plan.name}: the device memory estimate ~{gib(plan.memory.total)} per process is more "
                        f"than an 80 GiB GPU holds (largest: {largest} {gib(parts[largest])})")


def build_plan(cfg: RunConfig, force: bool = False, here: bool = True) -> Plan:
    """The plan of ``cfg`` (validated): teacher, stages, run directory and resume state. Reads the
    run directory if it exists; writes nothing. What the run would refuse as it starts is refused
    with the run's own checks (one line): a run directory that cannot be made, a student its
    inheritance cannot fill from its source and, when the run would run ``here`` (on this machine,
    not on a cluster's node), a ``train.device`` or ``train.precision`` this machine does not have."""
    from compress.precision import run_device
    from compress.rundir import check_writable

    warnings: list[str] = []
    recipe = Recipe.of(cfg)
    run_dir = recipe.run_dir
    if here:
        run_device(cfg)
    check_writable(run_dir)
    teacher = model_facts(cfg.teacher, "teacher", warnings) if cfg.teacher is not None else None
    check_inheritances(cfg, teacher, recipe)
    state, verdict = run_state(recipe, run_dir, force, warnings)
    plans: list[StagePlan] = []
    members = [model_facts(spec, f"teachers[{k}]", warnings) for k, spec in enumerate(cfg.teachers[1:], start=1)]
    for stage in recipe.stages:
        plans.append(_stage_plan(stage, recipe, teacher, plans[-1] if plans else None, run_dir, force, warnings,
                                 members))
    if verdict is not None:
        for plan in plans:
            plan.state = f"not run (the run is {verdict})"
    warnings.extend(missing_paths(cfg))
    cache = cache_lines(cfg, [teacher, *members]) if teacher is not None else []
    return Plan(cfg.name, recipe.run_id, run_dir, teacher, plans, state, recipe.staged, warnings, members, cache)
