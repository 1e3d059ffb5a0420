"""The plan of a run without running it (``clip-compress run CONFIG --dry-run``).

:func:`build_plan` turns a validated config into a :class:`Plan`: per stage its source, inheritance,
student with its parameters (TinyCLIP's count: vision tower / text tower without the token
embedding) and MACs per image and per text, steps, samples seen, losses, schedules, and what running
the command would do in the run directory (start, resume from a checkpoint, skip a completed run).
:func:`format_plan` prints it. Nothing is trained, downloaded or written: models are built from
their architecture on the ``meta`` device (no memory, no initialisation) with random weights
standing in for pretrained tags and weight files; only a local exported folder is read from disk.

For automatic inheritance the student's size is decided by training: the plan gives the cumulative
target q and the expected parameter count at the target, (1 - q) x the teacher's prunable parameters
(of the masked towers) + the rest (TinyCLIP §3.3; targets are cumulative, see
:mod:`compress.config.stages`).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.config import ConfigError, ModelSpec, RunConfig, schedule_context
from compress.config.stages import ResolvedStage, resolve_stages
from compress.config.validate import build_inheritance, loss_weight_keys
from compress.memory import (
    REFERENCE_GPU_BYTES,
    HostEstimate,
    MemoryEstimate,
    ModelShape,
    estimate_device_memory,
    estimate_host_memory,
    gib,
    model_shape,
    shape_of_model,
    world_size_of,
)
from compress.registry import spec_text
from compress.rundir import stage_dir

log = logging.getLogger(__name__)

#: data set kinds read from a path
_PATH_KINDS = ("csv", "folder", "webdataset")


@dataclass
class ModelFacts:
    """A model as the plan shows it: where its weights come from and its size (``None``: unknown)."""

    label: str
    note: str = ""
    vision: int | None = None
    text: int | None = None
    token_embedding: int | None = None
    total: int | None = None
    macs_image: int | None = None
    macs_text: int | None = None
    #: what the memory estimate reads (:mod:`compress.memory`)
    shape: ModelShape | None = None
    #: the model with its shapes and no weights (PyTorch's ``meta`` device), for the inheritance check
    build: Callable[[], nn.Module] | None = field(default=None, repr=False, compare=False)

    @property
    def prunable(self) -> int | None:
        """Vision tower + text tower without the token embedding (what TinyCLIP counts and prunes)."""
        return None if self.vision is None or self.text is None else self.vision + self.text


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


# -- models -------------------------------------------------------------------------------------
def facts_of_model(model: nn.Module) -> dict[str, int]:
    """``parameter_report`` and ``count_macs`` of a built model."""
    from compress.evaluation.efficiency import count_macs
    from compress.models.params import parameter_report

    report = parameter_report(model)
    macs = count_macs(model)
    return {
        "vision": report["vision"],
        "text": report["text"],
        "token_embedding": report["token_embedding"],
        "total": report["total"],
        "macs_image": macs["macs_image"],
        "macs_text": macs["macs_text"],
    }


@functools.lru_cache(maxsize=64)
def _architecture_facts(cfg_json: str) -> tuple[tuple[str, int], ...]:
    """Counts of an open_clip model config, built once per architecture on the ``meta`` device
    (shapes only: a ViT-B/32 takes well under a second); built for real if ``meta`` fails."""
    from compress.models.factory import build_from_config

    cfg = json.loads(cfg_json)
    try:
        facts = facts_of_model(shape_model(cfg))
    except Exception as error:  # an op without a meta kernel in this torch: count on a real build
        log.debug("plan: counting %s on the meta device failed (%s); building it on the CPU", cfg, error)
        facts = facts_of_model(build_from_config(cfg))
    return tuple(facts.items())


def shape_model(model_cfg: Mapping[str, Any]) -> nn.Module:
    """An open_clip model config built on the ``meta`` device: every shape, no weights, no memory."""
    from compress.models.factory import build_from_config

    with torch.device("meta"):
        return build_from_config(model_cfg)


def architecture_facts(model_cfg: Mapping[str, Any]) -> dict[str, int]:
    """Parameters (vision, text, token_embedding, total) and MACs (macs_image, macs_text) of a config."""
    return dict(_architecture_facts(json.dumps(dict(model_cfg), sort_keys=True)))


def model_facts(spec: ModelSpec, role: str, warnings: list[str]) -> ModelFacts:
    """The size of ``spec`` without its weights: a tag or a weight file is replaced by random weights
    of its architecture; a checkpoint gives its architecture from its metadata; an exported folder
    is read. A missing local file is a warning (counts unknown), an unknown tag or an activation
    that does not fit the tag's weights an error (``ModelLoadError``), as the run would fail."""
    from compress.models.factory import (
        _looks_like_path,
        check_pretrained_tag,
        checkpoint_config,
        get_model_config,
        load_model,
        read_config_file,
        resolve_spec,
    )

    kind, name, pretrained = resolve_spec(spec.model, spec.pretrained)
    label = spec.model if spec.pretrained is None else f"{spec.model} (pretrained: {spec.pretrained})"
    path = Path(name)
    if kind == "exported":
        model = load_model(spec.model, force_quick_gelu=spec.force_quick_gelu)
        facts = ModelFacts(label, f"read from {path}", **facts_of_model(model), shape=shape_of_model(model))
        shapes = model.to("meta")  # its weights are not needed any more
        facts.build = lambda: shapes
        return facts
    if kind == "file":
        if not path.is_file():
            warnings.append(f"{role}.model: no such file: {path}")
            return ModelFacts(label, "file missing: size unknown")
        if path.suffix == ".json":
            cfg = read_config_file(path)
        else:
            cfg = checkpoint_config(path)
            if cfg is None:
                warnings.append(f"{role}.model: {path} carries no model config; size unknown")
                return ModelFacts(label, "size unknown")
    else:
        cfg = get_model_config(name)
    cfg = copy.deepcopy(cfg)
    if spec.force_quick_gelu:
        cfg["quick_gelu"] = True
    note = "random weights (an architecture without pretrained weights)" if role == "teacher" else ""
    if kind == "file" and path.suffix != ".json":
        note = f"architecture from {path.name}'s metadata; random weights stand in for its weights"
    if pretrained:
        if kind == "named" and not _looks_like_path(pretrained):
            check_pretrained_tag(name, pretrained, cfg)
        elif not Path(pretrained).is_file():
            warnings.append(f"{role}.pretrained: no such file: {pretrained}")
        note = f"random weights stand in for {pretrained}"
    facts = architecture_facts(cfg)
    return ModelFacts(label, note, **facts, shape=model_shape(cfg, facts["total"]), build=lambda: shape_model(cfg))


# -- the run directory --------------------------------------------------------------------------
def _stage_state(directory: Path, cfg: RunConfig, force: bool, staged: bool, warnings: list[str]) -> str:
    """What the run would do with this stage's folder: skip, resume (from which step), start."""
    from compress.checkpoint import CheckpointError, config_hash, latest_checkpoint
    from compress.results import STATUS_COMPLETED, read_result

    if force:
        return "starts at step 0 (--force: what an earlier attempt left is removed)"
    if staged:
        done = read_result(directory)
        if done is not None and done.get("status") == STATUS_COMPLETED:
            return "completed: kept (its exported model is the next stage's source)"
    try:
        checkpoint = latest_checkpoint(directory)
    except CheckpointError as error:
        warnings.append(f"{directory}: {error}")
        return "an unreadable checkpoint is there (see the warnings)"
    if checkpoint is None:
        return "starts at step 0"
    try:
        checkpoint.check_owner(cfg.run_id(), config_hash(cfg))
    except CheckpointError as error:
        warnings.append(str(error))
        return f"a checkpoint of another run or config ({checkpoint.meta.get('run_id')}) is there: refused"
    return f"resumes from its checkpoint at step {checkpoint.step} ({checkpoint.path.name})"


def _run_state(cfg: RunConfig, run_dir: Path, force: bool, warnings: list[str]) -> tuple[str, str | None]:
    """What the command would do with the run as a whole, and what overrides every stage's state
    (``"skipped"``: a completed run; ``"refused"``: the folder belongs to another run), if anything."""
    from compress.results import STATUS_COMPLETED, read_result
    from compress.rundir import recorded_run_id

    if not run_dir.exists():
        return f"{run_dir} does not exist yet: the run starts at step 0", None
    owner = recorded_run_id(run_dir)
    if owner is not None and owner != cfg.run_id():
        warnings.append(f"{run_dir} belongs to run {owner}, not to this config's run ({cfg.run_id()}); choose another "
                        "output.run_name")
        return f"{run_dir} belongs to another run ({owner}): the run would be refused", "refused"
    done = read_result(run_dir)
    if done is not None and done.get("status") == STATUS_COMPLETED and done.get("run_id") == cfg.run_id():
        if force:
            return "a completed result is there; --force reruns the run from step 0", None
        return "a completed result is there: the run would be skipped (--force reruns it)", "skipped"
    return f"{run_dir} exists: each stage below says whether it resumes", None


# -- data paths ---------------------------------------------------------------------------------
def missing_paths(cfg: RunConfig) -> list[str]:
    """Data and evaluation paths that do not exist here (warnings of a dry run; a real run fails on
    them before training: the evaluation sets are built first)."""
    out: list[str] = []
    for where, ds in (("data.train", cfg.data.train), ("data.val", cfg.data.val)):
        if ds is None or ds.kind not in _PATH_KINDS:
            continue
        if not ds.path:
            out.append(f"{where}.path: not set (--set {where}.path=...)")
        elif ds.kind == "webdataset":
            out.extend(_missing_shards(where, ds.path))
        elif not Path(ds.path).exists():
            out.append(f"{where}.path: {ds.path} does not exist (--set {where}.path=...)")
    for i, task in enumerate(cfg.eval.zero_shot):
        if task.kind != "synthetic" and task.path and not Path(task.path).exists():
            out.append(f"eval.zero_shot[{i}].path: {task.path} does not exist (--set eval.zero_shot.{i}.path=...)")
    return out


def _missing_shards(where: str, pattern: str) -> list[str]:
    from compress.data.shards import expand_urls

    urls = expand_urls(pattern)
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not Path(u).is_file()]
    if not missing:
        return []
    return [f"{where}.path: {len(missing)} of {len(urls)} shards of {pattern} do not exist, e.g. {missing[0]} "
            f"(--set {where}.path=...)"]


# -- stages -------------------------------------------------------------------------------------
def _plain_spec(spec: Any) -> dict[str, Any]:
    """A plug-in spec as a dict (a bare name is ``{"name": name}``)."""
    return {"name": spec} if isinstance(spec, str) else dict(spec)


def _losses(cfg: RunConfig) -> list[str]:
    out = []
    for spec in cfg.losses:
        params = _plain_spec(spec)
        weight = float(params.pop("weight", 1.0))
        out.append(f"{spec_text(params)} x {weight:g}")
    return out


def _schedules(cfg: RunConfig, inheritance: Any) -> list[str]:
    """Each schedule with its base value and its values at the first, middle and last step."""
    from compress.registry import SCHEDULES

    steps = cfg.train.steps
    replaced = inheritance.replacement_step()
    weight_keys = loss_weight_keys(cfg.losses)
    out = []
    for key, spec in cfg.schedules.items():
        context = schedule_context(cfg, key)
        schedule = SCHEDULES.build(spec, context=context)
        # the lr after the strategy replaced the student is the strategy's (its schedule lines say which)
        points = sorted({0, replaced} if key == "lr" and replaced is not None else {0, steps // 2, steps - 1})
        values = ", ".join(f"step {s}: {schedule.value(s):.3g}" for s in points)
        base = f", base {context['base_value']:g}" if "base_value" in context else ""
        what = f" (losses[{weight_keys[key]}])" if key != "lr" else ""
        out.append(f"{key}{what}: {spec_text(spec)}{base}; {values}")
    return out + inheritance.schedule_lines(steps)


def _stage_plan(
    stage: ResolvedStage,
    staged: bool,
    teacher: ModelFacts | None,
    previous: StagePlan | None,
    run_dir: Path,
    run_cfg: RunConfig,
    force: bool,
    warnings: list[str],
) -> StagePlan:

    cfg = stage.cfg
    directory = stage_dir(run_dir, stage.dir_name if staged else None)
    inheritance = build_inheritance(cfg)
    spec = _plain_spec(cfg.inheritance)
    stage_target = inheritance.pruning_target()
    target = stage.target_sparsity if stage.target_sparsity is not None else stage_target
    if not inheritance.needs_source:
        source_text = "none: random initialisation (the source is not read)"
    elif stage.source == "teacher":
        source_text = f"the teacher ({teacher.label})" if teacher is not None else "the teacher"
    else:
        source_text = f"stage {previous.index} ({previous.name})'s exported student" if previous else "previous"
    student: ModelFacts | None = None
    expected_prunable = expected_total = None
    if inheritance.needs_student_config:
        if cfg.student is None:
            student_text = "(none)"
        else:
            where = f"stages[{stage.index}].student" if staged else "student"
            student = model_facts(cfg.student, where, warnings)
            student_text = student.label
    else:
        student_text = inheritance.describe_student("the teacher" if stage.source == "teacher" else source_text)
        if target is not None and teacher is not None and teacher.prunable is not None:
            masked = sum(getattr(teacher, t) for t in inheritance.towers)  # the target's towers
            expected_prunable = round((1.0 - target) * masked) + teacher.prunable - masked
            expected_total = expected_prunable + teacher.total - teacher.prunable
    steps, batch = cfg.train.steps, cfg.train.batch_size
    samples = steps * batch
    available = cfg.data.train.num_samples
    plan = StagePlan(
        index=stage.index,
        name=stage.name,
        source=stage.source,
        source_text=source_text,
        inheritance=spec_text(spec, skip=(inheritance.target_parameter,) if inheritance.target_parameter else ()),
        student=student,
        student_text=student_text,
        target_sparsity=target,
        stage_target=stage_target,
        expected_prunable=expected_prunable,
        expected_total=expected_total,
        steps=steps,
        batch_size=batch,
        accum_steps=cfg.train.accum_steps,
        samples=samples,
        epochs=samples / available if available else None,
        losses=_losses(cfg),
        schedules=_schedules(cfg, inheritance),
        directory=directory,
        state=_stage_state(directory, run_cfg, force, staged, warnings),
        towers=tuple(inheritance.towers),
        world_size=world_size_of(cfg),
        micro_batch=cfg.train.micro_batch(world_size_of(cfg)),
        grad_checkpointing=cfg.train.grad_checkpointing,
    )
    _add_memory(plan, cfg, teacher, previous, warnings)
    return plan


def check_inheritances(cfg: RunConfig, teacher: ModelFacts | None = None) -> None:
    """Every stage's student against its source (:func:`check_inheritance`): the teacher, or the previous stage's
    student (not checked after a stage that learns its structure). The dry run and the run before it starts
    (:func:`experiments.dispatch.check_before_run`) both ask it; ``teacher``: its facts when known already."""

    warnings: list[str] = []  # a missing file: not checked here, the plan warns
    if teacher is None and cfg.teacher is not None:
        teacher = model_facts(cfg.teacher, "teacher", warnings)
    resolved = resolve_stages(cfg)
    previous: ModelFacts | None = None
    for stage in resolved or [ResolvedStage(0, cfg.name, "teacher", None, cfg)]:
        inheritance = build_inheritance(stage.cfg)
        student = None
        if inheritance.needs_student_config and stage.cfg.student is not None:
            where = f"stages[{stage.index}].student" if resolved else "student"
            student = model_facts(stage.cfg.student, where, warnings)
            check_inheritance(inheritance, student, teacher if stage.source == "teacher" else previous, where)
        previous = student


def check_inheritance(inheritance: Any, student: ModelFacts, source: ModelFacts | None, where: str) -> None:
    """The run's own check of the student against its source (:meth:`compress.plugins.Inheritance.check`: manual
    inheritance refuses a student larger than its source), on shape-only models; a :class:`ConfigError` naming
    the student's key. A source of unknown shape (a missing file, a stage that learns its structure) is not
    checked."""
    if student.build is None or source is None or source.build is None:
        return
    try:
        shapes = student.build(), source.build()
    except Exception as error:  # an op without a meta kernel in this torch: the run checks it as it starts
        log.debug("plan: building %s or its source on the meta device failed (%s): not checked", where, error)
        return
    try:
        inheritance.check(*shapes)
    except ValueError as error:
        raise ConfigError(f"{where}: {error}") from None


def _add_memory(plan: StagePlan, cfg: RunConfig, teacher: ModelFacts | None, previous: StagePlan | None,
                warnings: list[str]) -> None:
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
    teacher_shape = teacher.shape if teacher is not None else None
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
    from compress.run import run_device, run_dir_for
    from compress.rundir import check_writable

    warnings: list[str] = []
    run_id = cfg.run_id()
    run_dir = run_dir_for(cfg)
    if here:
        run_device(cfg)
    check_writable(run_dir)
    resolved = resolve_stages(cfg)
    staged = bool(resolved)
    stages = resolved or [ResolvedStage(0, cfg.name, "teacher", None, cfg)]
    teacher = model_facts(cfg.teacher, "teacher", warnings) if cfg.teacher is not None else None
    check_inheritances(cfg, teacher)
    state, verdict = _run_state(cfg, run_dir, force, warnings)
    plans: list[StagePlan] = []
    for stage in stages:
        plans.append(_stage_plan(stage, staged, teacher, plans[-1] if plans else None, run_dir, cfg, force,
                                 warnings))
    if verdict is not None:
        for plan in plans:
            plan.state = f"not run (the run is {verdict})"
    warnings.extend(missing_paths(cfg))
    return Plan(cfg.name, run_id, run_dir, teacher, plans, state, staged, warnings)


# -- printing -----------------------------------------------------------------------------------
def _m(count: int | None) -> str:
    return "?" if count is None else f"{count / 1e6:.2f}M"


def _g(count: int | None) -> str:
    """MACs in G (M, k for tiny models)."""
    if count is None:
        return "?"
    for size, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)


def _count(n: int) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _facts_line(facts: ModelFacts) -> str:
    return (f"params vision {_m(facts.vision)}, text {_m(facts.text)} (+ token embedding "
            f"{_m(facts.token_embedding)}); MACs per image {_g(facts.macs_image)}, per text {_g(facts.macs_text)}")


def _kib(n: int) -> str:
    return f"{n / 2**10:.0f} KiB" if n >= 2**10 else f"{n} B"


def _memory_lines(s: StagePlan) -> list[str]:
    """Micro-batch, host and device memory of one step per process (:mod:`compress.memory`)."""
    world = s.world_size
    micro = s.micro_batch
    head = (f"  memory       micro-batch {micro} per process (batch {s.batch_size} / ({world} process"
            f"{'es' if world != 1 else ''} x {s.accum_steps} micro-batch{'es' if s.accum_steps != 1 else ''}))")
    if s.memory is None or s.host is None:
        return [head, "               host and device memory unknown (a model's size is unknown)"]
    h, m = s.host, s.memory
    workers = f"{h.batches_in_flight} micro-batches" if h.batches_in_flight > 1 else "1 micro-batch"
    loaders = "the loader" if h.loaders == 1 else f"{h.loaders} loaders"
    again = "; the second reads the step again" if h.loaders > 1 else ""
    kept = (f"the step's {h.retained_samples} samples (kept for the gradient cache's second pass)"
            if h.retained_samples else "the step's tokens (for the loss)")
    host = (f"               host ~{gib(h.total)}: {gib(h.in_flight)} in flight in {loaders} ({workers} of {micro} x "
            f"{_kib(h.bytes_per_sample)}{again}) + {gib(h.retained)} for {kept}")
    lower = "+" if m.unknown else ""
    sims = (f" ({m.similarity_matrices} + 3 working of {m.rows} x {m.columns} fp32)" if m.similarities else "")
    device = (f"               device ~{gib(m.total)}{lower} in {m.precision}: weights {gib(m.weights)}, optimizer "
              f"{gib(m.optimizer)}, activations {gib(m.activations)} (one micro-batch"
              f"{', grad checkpointing' if s.grad_checkpointing else ''}), features {gib(m.features)}, similarities "
              f"{gib(m.similarities)}{sims}")
    lines = [head, host, device]
    if m.unknown:
        lines.append(f"               not estimated: {', '.join(m.unknown)}")
    if s.memory_note:
        lines.append(f"               {s.memory_note}")
    return lines


def format_plan(plan: Plan) -> str:
    """The plan as the CLI prints it."""
    n = len(plan.stages)
    lines = [
        f"plan of {plan.name} (run id {plan.run_id}): {n} stage{'s' if n != 1 else ''}; dry run: nothing is "
        "trained, downloaded or written",
        f"run directory  {plan.run_dir}",
        f"               {plan.state}",
    ]
    if plan.teacher is not None:
        t = plan.teacher
        lines += [f"teacher        {t.label} (frozen, the same for every stage)", f"               {_facts_line(t)}"]
        if t.note:
            lines.append(f"               {t.note}")
    else:
        lines.append("teacher        none")
    for s in plan.stages:
        lines.append("")
        lines.append(f"stage {s.index}: {s.name}" if plan.staged else "training")
        if plan.staged:
            lines.append(f"  directory    {s.directory}")
        lines.append(f"  source       {s.source_text}")
        lines.append(f"  inheritance  {s.inheritance}")
        lines.append(f"  student      {s.student_text}")
        if s.student is not None:
            lines.append(f"               {_facts_line(s.student)}")
            if s.student.note:
                lines.append(f"               {s.student.note}")
        if s.target_sparsity is not None:
            per_stage = ""
            if s.stage_target is not None and abs(s.stage_target - s.target_sparsity) > 1e-9:
                per_stage = f"; this stage removes {s.stage_target:.1%} of its source"
            whose = "the teacher's" if s.towers == ("vision", "text") else f"the teacher's {'+'.join(s.towers)}"
            lines.append(f"  target       {s.target_sparsity:.1%} of {whose} prunable parameters removed "
                         f"(cumulative){per_stage}")
            if s.expected_prunable is not None:
                lines.append(f"  expected     vision + text {_m(s.expected_prunable)} at the target (total "
                             f"{_m(s.expected_total)}); the split between towers and the MACs are decided by training")
        micro = s.batch_size // s.accum_steps
        accum = f" ({s.accum_steps} micro-batches of {micro})" if s.accum_steps > 1 else ""
        epochs = f" = {s.epochs:.2f} epochs of data.train" if s.epochs is not None else ""
        lines.append(f"  steps        {s.steps} x batch {s.batch_size}{accum} = {_count(s.samples)} samples{epochs}")
        lines.extend(_memory_lines(s))
        lines.append(f"  losses       {'; '.join(s.losses)}")
        for i, text in enumerate(s.schedules):
            lines.append(f"  {'schedules' if i == 0 else '':<11}  {text}")
        lines.append(f"  state        {s.state}")
    if plan.warnings:
        lines.append("")
        lines.append("warnings:")
        lines.extend(f"  {w}" for w in plan.warnings)
    return "\n".join(lines)
