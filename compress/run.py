"""One run, end to end: config -> teacher, student, data, training, export, evaluation, result row."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress import distributed, stopping
from compress.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointWriteError,
    config_hash,
    latest_checkpoint,
    rebuild_student,
    remove_checkpoints,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from compress.config import ConfigError, RunConfig, dump_config
from compress.config.stages import ResolvedStage, pruned_towers, resolve_stages, with_source_fraction
from compress.config.validate import inheritance_context, loss_weight_keys, schedule_context
from compress.fileio import NO_SPACE, atomic_write_text, write_failure
from compress.models import load_model
from compress.models.forward import context_length_of, embed_dim, tokenizer_for
from compress.models.params import parameter_report, prunable_count
from compress.models.towers import TOWERS
from compress.precision import DeviceError, Precision, available_device, resolve_device, resolve_precision
from compress.registry import INHERITANCE, LOSSES, SCHEDULES
from compress.results import (
    RESULT_FILE,
    STATUS_COMPLETED,
    STATUS_FAILED,
    STATUS_INTERRUPTED,
    make_row,
    read_result,
    write_result,
)
from compress.rundir import (
    CONFIG_FILE,
    METRICS_FILE,
    MODEL_DIR,
    RUN_OUTPUTS,
    check_writable,
    owned_run_dir,
    run_dir_for,
    stage_dir,
    unwritable,
)
from compress.stopping import RunInterrupted, StoppedAtStep
from compress.teacher import OnlineTeacher, freeze
from compress.train import LossTerm, Trainer

log = logging.getLogger(__name__)


class RunError(RuntimeError):
    """The run's configuration cannot be executed as written."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def build_losses(cfg: RunConfig, student: nn.Module, teacher: nn.Module | None) -> list[LossTerm]:
    """The loss terms with their weights, and the weight schedules (``schedules.weight/<loss>``)."""
    context = {"student_embed_dim": embed_dim(student)}
    if teacher is not None:
        context["teacher_embed_dim"] = embed_dim(teacher)
    schedule_of = {i: key for key, i in loss_weight_keys(cfg.losses).items() if key in cfg.schedules}
    terms = []
    for i, spec in enumerate(cfg.losses):
        params = dict(spec)
        weight = float(params.pop("weight", 1.0))
        schedule = None
        if i in schedule_of:
            key = schedule_of[i]
            schedule = SCHEDULES.build(cfg.schedules[key], context=schedule_context(cfg, key))
        terms.append(LossTerm(params["name"], weight, LOSSES.build(params, context=context), schedule))
    return terms


def build_student(cfg: RunConfig, inheritance: Any, source: nn.Module | None) -> nn.Module:
    """The student to train: built from ``cfg.student`` (random) and filled by the strategy."""
    student = None
    if inheritance.needs_student_config:
        if cfg.student is None:
            raise RunError(f"student: inheritance {cfg.inheritance['name']!r} needs a student model config")
        s = cfg.student
        student = load_model(s.model, pretrained=s.pretrained, force_quick_gelu=s.force_quick_gelu)
    elif source is None:
        raise RunError(f"inheritance {cfg.inheritance['name']!r} needs a source model (a teacher)")
    return inheritance.inherit(student, source)


def check_batch_split(cfg: RunConfig, world: int) -> None:
    """``train.batch_size`` is the global batch: it must split into equal per-process micro-batches."""
    for k, stage in enumerate(resolve_stages(cfg) or [None]):
        train = stage.cfg.train if stage is not None else cfg.train
        where = f"stages[{k}] ({stage.name}): " if stage is not None else ""
        if train.batch_size % (world * train.accum_steps):
            raise ConfigError(
                f"{where}train.batch_size {train.batch_size} is the global batch: it must be a multiple of "
                f"{world} process(es) x train.accum_steps {train.accum_steps} = {world * train.accum_steps}"
            )


def sparsity_metrics(
    inheritance: Any, teacher: nn.Module | None, exported: nn.Module, run: StageRun | None = None
) -> dict[str, Any]:
    """Achieved sparsity of the exported student against the teacher, counted TinyCLIP's way (a
    tower's parameters without the token embedding) over the towers the strategy prunes
    (``inheritance.towers``; both by default), the towers its target is a fraction of; with one
    tower, ``sparsity/achieved_both`` counts both. With a target: ``sparsity/error`` is achieved -
    target (signed), ``sparsity/missed`` is true when it is more than :data:`SPARSITY_TOLERANCE`
    either way, ``sparsity/overshoot`` when the student was pruned more than that beyond it. In a
    staged run, ``sparsity/achieved`` and ``sparsity/target`` are cumulative (against the teacher)
    and ``sparsity/stage_achieved`` / ``sparsity/stage_target`` are against the stage's own source."""
    if teacher is None:
        return {}
    towers = tuple(getattr(inheritance, "towers", TOWERS))
    achieved = 1.0 - prunable_count(exported, towers) / prunable_count(teacher, towers)
    out: dict[str, Any] = {"sparsity/achieved": round(achieved, 6)}
    if set(towers) != set(TOWERS):
        out["sparsity/towers"] = "+".join(towers)
        out["sparsity/achieved_both"] = round(1.0 - prunable_parameters(exported) / prunable_parameters(teacher), 6)
    target = getattr(inheritance, "target_sparsity", None)
    stage = run.stage if run is not None else None
    if stage is not None and run is not None and run.source is not None:
        kept = prunable_count(exported, towers) / prunable_count(run.source, towers)
        out["sparsity/stage_achieved"] = round(1.0 - kept, 6)
        if target is not None:
            out["sparsity/stage_target"] = float(target)
        target = stage.target_sparsity
    if target is not None:
        error = achieved - float(target)
        out["sparsity/target"] = float(target)
        out["sparsity/error"] = round(error, 6)
        out["sparsity/missed"] = abs(error) > SPARSITY_TOLERANCE
        out["sparsity/overshoot"] = error > SPARSITY_TOLERANCE
    return out


#: how far from its target (either way) an automatically pruned student may end before the row says ``missed``
SPARSITY_TOLERANCE = 0.02


def run_experiment(cfg: RunConfig, force: bool = False) -> dict[str, Any]:
    """Run ``cfg`` and return its result row; the row is also written to ``result.json``,
    for a failed run too (status ``failed`` and the error) and for one stopped by SIGTERM, SIGUSR2
    or Ctrl-C (status ``interrupted``, then the interruption is raised again). SIGTERM and SIGUSR2
    during training end it after the step in progress, with a checkpoint of that step on every rank
    together and the step in the row (:mod:`compress.stopping`).

    A run started again in its run directory resumes: finished stages are kept, and the
    current stage continues from its newest checkpoint (:mod:`compress.checkpoint`), exactly
    where it was. ``force`` removes what an earlier attempt left and starts at step 0.

    The run directory is held for the whole run (:func:`compress.rundir.owned_run_dir`): a
    second process, or another config reusing the folder, raises ``RunDirError`` and touches
    nothing there.

    Started as several processes (torchrun, or a submitit job with one task per GPU; see
    :func:`compress.distributed.environment`), the run joins their process group and trains
    data-parallel: rank 0 holds the directory and writes checkpoints, metrics, the model and the
    rows, and evaluates alone; ``train.batch_size`` is the global batch."""
    run_dir = run_dir_for(cfg)
    device, precision = run_device(cfg)
    with distributed.process_group(device), contextlib.ExitStack() as held:
        check_batch_split(cfg, distributed.world_size())

        def prepare() -> None:  # rank 0 holds the directory and clears it before any rank reads it
            check_writable(run_dir)
            try:
                held.enter_context(owned_run_dir(run_dir, cfg.run_id()))
                run_dir.mkdir(parents=True, exist_ok=True)
                distributed.clear_failures(run_dir)
                if force:
                    start_fresh(run_dir)
                atomic_write_text(run_dir / CONFIG_FILE, dump_config(cfg))
            except OSError as error:  # a full disk, or what only writing shows: no row can be written yet
                raise unwritable(run_dir, error) from error

        distributed.main_first(prepare)
        return _run_in(cfg, run_dir, device, precision)


def run_device(cfg: RunConfig) -> tuple[torch.device, Precision]:
    """The device this process trains on (``train.device``; ``cuda`` is ``cuda:LOCAL_RANK`` in a run of several
    processes) and the precision there (``train.precision``), refused with a :class:`ConfigError` naming the key
    when this machine does not have them. The run asks before anything is written; its dry run asks too."""
    try:
        device = available_device(distributed.local_device(resolve_device(cfg.train.device)))
    except DeviceError as error:
        raise ConfigError(f"train.device: {error}") from None
    try:
        return device, resolve_precision(cfg.train.precision, device)
    except ValueError as error:
        raise ConfigError(f"train.precision: {error}") from None


def start_fresh(run_dir: Path) -> None:
    """Remove checkpoints, stage folders, metrics, result, model and reports of an earlier attempt."""
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


@dataclass
class StageRun:
    """One stage to execute: its config and folder, where its weights come from, its seed."""

    cfg: RunConfig
    directory: Path
    stage: ResolvedStage | None
    source: nn.Module | None
    seed: int


def _run_in(cfg: RunConfig, run_dir: Path, device: torch.device, precision: Precision) -> dict[str, Any]:
    started = time.time()
    main = distributed.is_main_process()
    stages: list[ResolvedStage | None] = list(resolve_stages(cfg)) or [None]
    metrics: dict[str, Any] = {}
    current: StageRun | None = None

    def row_for(status: str, error: BaseException | None = None, step: int | None = None) -> dict[str, Any]:
        stage = current.stage if current is not None else stages[-1] if status == STATUS_COMPLETED else None
        extra = {"stage": stage.dir_name} if stage is not None else {}
        if step is not None:  # an interrupted run: the optimizer steps its checkpoint holds
            extra["step"] = step
        return make_row(run_id=cfg.run_id(), name=cfg.name, status=status, config=cfg.to_dict(), started=started,
                        metrics=metrics, error=error, extra=extra)

    def write_rows(status: str, error: BaseException | None = None, run_row: bool = True,
                   step: int | None = None) -> dict[str, Any]:
        """The current stage's row (a staged run) and, unless a stage finished before the last, the run's."""
        row = row_for(status, error, step)
        if main and current is not None and current.stage is not None:
            stage_row = make_row(run_id=cfg.run_id(), name=cfg.name, status=status, config=current.cfg.to_dict(),
                                 started=started, metrics=metrics, error=error,
                                 extra={"step": step} if step is not None else None)
            write_result(current.directory, stage_row)
        if main and run_row:
            write_result(run_dir, row)
        return row

    def write_final_rows(status: str, error: BaseException | None = None,
                         step: int | None = None) -> tuple[dict[str, Any], str]:
        """:func:`write_rows` after a failure or a stop, and where the one line that says so sends the user: a
        row that cannot be written (the disk is full) is said there instead, and the run's outcome still
        reaches the caller."""
        try:
            return write_rows(status, error, step=step), f"see {run_dir / RESULT_FILE}"
        except OSError as unwritten:
            return row_for(status, error, step), (f"the {status} row could not be written to {run_dir / RESULT_FILE}: "
                                                  f"{write_failure(unwritten) or unwritten}")

    for stage in stages:  # another run's or another config's checkpoint: refused before anything is loaded
        directory = stage_dir(run_dir, stage.dir_name if stage is not None else None)
        checkpoint = latest_checkpoint(directory) if not _completed(directory, stage) else None
        if checkpoint is not None:
            checkpoint.check_owner(cfg.run_id(), config_hash(cfg))
    try:
        with stopping.stop_signals():
            seed_everything(cfg.seed)  # a random-init teacher (tests) is the same in every attempt
            teacher = load_teacher(cfg)
            previous: nn.Module | None = None
            for stage in stages:
                directory = stage_dir(run_dir, stage.dir_name if stage is not None else None)
                if _completed(directory, stage):
                    metrics = dict(read_result(directory)["metrics"])  # its model is the next stage's source
                    previous = load_model(str(directory / MODEL_DIR))
                    if main and not cfg.output.keep_checkpoints:  # a kill may have come before they were removed
                        remove_checkpoints(directory)
                    log.info("stage %s already completed: its exported model is the next stage's source",
                             stage.dir_name)
                    continue
                metrics = {}
                current = _stage_run(cfg, stage, directory, teacher, previous)
                _run_stage(current, cfg, teacher, device, precision, metrics)
                if stage is not None and stage is not stages[-1]:
                    write_rows(STATUS_COMPLETED, run_row=False)
                    _after_success(current)
                    current = None  # its row is final: a later failure must not overwrite it
                    # the next stage starts from this stage's exported model as saved (on every rank)
                    previous = load_model(str(directory / MODEL_DIR))
        row = write_rows(STATUS_COMPLETED)
        if current is not None:
            _after_success(current)
    except (KeyboardInterrupt, RunInterrupted) as interruption:  # a failing peer may be why (srun ends the step)
        step = interruption.step if isinstance(interruption, StoppedAtStep) else None
        _, where = write_final_rows(STATUS_INTERRUPTED, distributed.failure_with_causes(run_dir, interruption, wait_s=0)
                                    if main else interruption, step)
        if main and step is not None:
            print(f"clip-compress: run {cfg.name} {interruption}: the same command resumes it ({where})",
                  file=sys.stderr)
        elif step is None:
            print(f"clip-compress: run {cfg.name} interrupted ({where})", file=sys.stderr)
        raise
    except Exception as error:  # the row records the failure; the caller decides what to do with it
        distributed.record_failure(run_dir, error)
        if main:
            error = distributed.failure_with_causes(run_dir, error)
        row, where = write_final_rows(STATUS_FAILED, error)
        if isinstance(error, CheckpointWriteError):  # it says what and which checkpoint is kept
            print(f"clip-compress: error: run {cfg.name}: {error} ({where})", file=sys.stderr)
        elif write_failure(error) == NO_SPACE:  # the file system's fault, not the run's
            print(f"clip-compress: error: run {cfg.name}: {NO_SPACE} ({row['error']}) ({where})", file=sys.stderr)
        else:
            print(failed_line(cfg.name, row["error"], where), file=sys.stderr)
    return row


def failed_line(name: str, error: str | None, where: str) -> str:
    """The one line that says a run failed: its name, the first line of its row's error, where the row is."""
    first = (error or "unknown error").splitlines()[0] if (error or "").strip() else "unknown error"
    return f"clip-compress: run {name} failed: {first} ({where})"


def _completed(directory: Path, stage: ResolvedStage | None) -> bool:
    """A stage of a staged run whose row says completed (kept when the run is started again)."""
    if stage is None:
        return False
    done = read_result(directory)
    return done is not None and done.get("status") == STATUS_COMPLETED


#: stage k draws its data order and random states from ``seed + k * STAGE_SEED_STRIDE``
STAGE_SEED_STRIDE = 7919


def load_teacher(cfg: RunConfig) -> nn.Module | None:
    if cfg.teacher is None:
        return None
    t = cfg.teacher
    return freeze(load_model(t.model, pretrained=t.pretrained, force_quick_gelu=t.force_quick_gelu))


def _stage_run(
    cfg: RunConfig, stage: ResolvedStage | None, directory: Path, teacher: nn.Module | None,
    previous: nn.Module | None,
) -> StageRun:
    """The stage's source model and config: a cumulative target becomes the per-stage target of
    the previous stage's actual size (its achieved sparsity, not its target)."""
    if stage is None:
        return StageRun(cfg, directory, None, teacher, cfg.seed)
    source = teacher if stage.source == "teacher" else previous
    stage_cfg = stage.cfg
    if stage.target_sparsity is not None:
        fraction = 1.0
        if stage.source == "previous" and teacher is not None and previous is not None:
            towers = pruned_towers(stage.cfg)  # the target's towers
            fraction = prunable_count(previous, towers) / prunable_count(teacher, towers)
        stage_cfg = with_source_fraction(stage, fraction)
    return StageRun(stage_cfg, directory, stage, source, cfg.seed + STAGE_SEED_STRIDE * stage.index)


def prunable_parameters(model: nn.Module) -> int:
    """TinyCLIP's count: the vision tower and the text tower without the token embedding."""
    report = parameter_report(model)
    return report["vision"] + report["text"]


def _after_success(run: StageRun) -> None:
    """Once a stage's row says completed, its checkpoints go (unless ``output.keep_checkpoints``)."""
    if distributed.is_main_process() and not run.cfg.output.keep_checkpoints:
        remove_checkpoints(run.directory)


def _load_student(run: StageRun, inheritance: Any, checkpoint: Checkpoint | None) -> nn.Module:
    """The stage's student: from the checkpoint's record and weights when resuming a student that was
    made smaller (no strategy code involved), else built and filled by the strategy (a masked
    checkpoint's weights, masks and multipliers then loaded into it)."""
    record = checkpoint.student_record() if checkpoint is not None else None
    if record is not None and not record["masked"]:
        student = rebuild_student(record)
        student.load_state_dict(checkpoint.student_state(), strict=True, assign=True)
        return student
    student = build_student(run.cfg, inheritance, run.source)
    if checkpoint is not None:
        student.load_state_dict(checkpoint.student_state(), strict=True)
    return student


def _run_stage(
    run: StageRun, run_cfg: RunConfig, teacher: nn.Module | None, device: torch.device, precision: Any,
    metrics: dict[str, Any],
) -> None:
    """Train, export and evaluate one stage (resuming from its checkpoint); fills ``metrics`` as it
    goes, so a failure keeps what was measured."""
    from compress.data.pipeline import train_batches
    from compress.evaluation.run_eval import build_eval_sets, evaluate_prepared
    from compress.models.export import save_model
    from compress.models.nonuniform import write_structure

    cfg, directory = run.cfg, run.directory
    main = distributed.is_main_process()
    run_id, config_sha = run_cfg.run_id(), config_hash(run_cfg)
    checkpoint = latest_checkpoint(directory)  # its owner was checked when the run started
    if checkpoint is not None and checkpoint.meta.get("precision", precision.name) != precision.name:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} was written in {checkpoint.meta['precision']}, this attempt resolves "
            f"train.precision to {precision.name} (on {device}): set train.precision/train.device to resume it "
            "as it ran, or start fresh with --force"
        )
    if checkpoint is not None and checkpoint.meta.get("world_size", 1) != distributed.world_size():
        raise CheckpointError(
            f"checkpoint {checkpoint.path} was written by {checkpoint.meta.get('world_size', 1)} process(es), this "
            f"attempt has {distributed.world_size()}: each process's data position is in it, so resume with "
            f"{checkpoint.meta.get('world_size', 1)} (or start fresh with --force)"
        )
    if run.stage is not None:
        metrics.update({"stage/index": run.stage.index, "stage/name": run.stage.name, "stage/source": run.stage.source,
                        "stage/count": len(run_cfg.stages)})
    # what `auto` resolved to on this machine (the run id holds the config, not the machine)
    metrics.update({"train/device": str(device), "train/precision": precision.name})
    world = distributed.world_size()
    metrics.update({"dist/world_size": world, "dist/batch_per_process": cfg.train.batch_size // world})
    seed_everything(run.seed)
    inheritance = INHERITANCE.build(cfg.inheritance, context=inheritance_context(cfg))
    student = _load_student(run, inheritance, checkpoint)
    if teacher is not None and context_length_of(teacher) != context_length_of(student):
        raise RunError(
            f"teacher and student context lengths differ ({context_length_of(teacher)} vs "
            f"{context_length_of(student)}); both read the same tokens"
        )
    student = student.to(device)
    # evaluation sets are built before training, so a wrong path fails now, not after hours
    eval_sets = build_eval_sets(cfg.eval, cfg.data, student, tokenizer_for(student)) if main else None
    losses = build_losses(cfg, student, teacher)
    for term in losses:
        term.module.to(device)
    needs = {n for term in losses for n in term.module.needs}
    uses_teacher = any(term.module.needs_teacher for term in losses)
    batches, data_stats = train_batches(
        dataclasses.replace(cfg, seed=run.seed), student, teacher if uses_teacher else None, device
    )
    lr = SCHEDULES.build(cfg.schedules["lr"], context=schedule_context(cfg, "lr"))
    stage_index = run.stage.index if run.stage is not None else 0

    def write(trainer: Trainer) -> None:  # on every rank: each one's data position and random states go to rank 0
        ranks = distributed.gather_objects({"data": data_stats.loader.state_dict(), "rng": rng_state()})

        def save() -> None:  # rank 0; a failure (a full disk) reaches every rank instead of leaving them waiting
            state = {"trainer": trainer.state_dict(), "ranks": ranks}
            meta = {"run_id": run_id, "config_sha": config_sha, "stage": stage_index, "precision": precision.name,
                    "world_size": world}
            write_checkpoint(directory, trainer.step, trainer.student, state, meta, keep_every=cfg.output.keep_every)

        distributed.main_first(save)

    trainer = Trainer(
        cfg.train,
        student,
        losses,
        lr,
        batches,
        precision,
        teacher=OnlineTeacher(teacher, precision, needs) if teacher is not None else None,
        inheritance=inheritance,
        run_dir=directory if main else None,
        on_checkpoint=write if cfg.output.save_checkpoint else None,
        seed=run.seed,
        should_stop=stopping.agreed,
        replay=data_stats.replay,
    )
    if checkpoint is not None:
        state = checkpoint.state()
        trainer.load_state_dict(state["trainer"])
        ranks = state.get("ranks") or [{"data": state["data"], "rng": state["rng"]}]  # one process, older format
        mine = ranks[distributed.rank()]
        data_stats.loader.load_state_dict(mine["data"])
        if main:
            truncate_metrics(directory / METRICS_FILE, checkpoint.step)
        set_rng_state(mine["rng"])
        print(f"clip-compress: resuming {cfg.name} from {checkpoint.path} (step {checkpoint.step} of "
              f"{cfg.train.steps})", file=sys.stderr)
    elif main:
        (directory / METRICS_FILE).unlink(missing_ok=True)  # a fresh start: one series per run
    try:
        with stopping.deferred():  # a stop signal ends training after the step in progress, with a checkpoint
            summary = trainer.fit()
    finally:
        metrics.update(data_stats.as_metrics())  # this process's counts if training failed
    metrics.update(data_stats.as_metrics(all_ranks=True))
    metrics.update({f"train/{k}": v for k, v in summary.final_terms.items()})
    metrics.update(
        {
            "train/steps": summary.steps,
            "train/nonfinite_steps": summary.nonfinite_steps,
            "train/samples_per_s": summary.samples_per_s,
            "train/duration_s": summary.duration_s,
        }
    )
    exported = inheritance.export(trainer.student).eval()
    metrics.update(sparsity_metrics(inheritance, teacher, exported, run))
    if metrics.get("sparsity/missed"):
        how = "overshot" if metrics["sparsity/overshoot"] else "fell short of"
        print(
            f"clip-compress: warning: run {cfg.name} {how} its sparsity target: "
            f"{metrics['sparsity/achieved']:.1%} pruned for a target of {metrics['sparsity/target']:.1%} "
            f"({100 * metrics['sparsity/error']:+.1f} points)",
            file=sys.stderr,
        )

    def finish() -> None:  # rank 0, while the others wait (an error there reaches every rank)
        metrics["export/path"] = str(save_model(exported, directory / MODEL_DIR))
        write_structure(exported, directory, **report_reference(run, run_cfg, inheritance, metrics))
        metrics.update(evaluate_prepared(exported, eval_sets, cfg.eval, device, precision.name, cfg.train.progress))

    distributed.main_first(finish)  # after it, the model is on disk: the next stage loads it on every rank


def report_reference(run: StageRun, run_cfg: RunConfig, inheritance: Any, metrics: dict[str, Any]) -> dict[str, Any]:
    """What a stage's structure report compares its exported student with, and its title: the model it
    inherited from (the teacher, or the previous stage's model) with the strategy's ``layer_map`` where it
    has one, titled with the run and its sparsity against that source (TinyCLIP's count, as in the row);
    a strategy that does not read the source (``none``) is shown against its own config."""
    label = run_dir_for(run_cfg).name + (f" stage {run.stage.dir_name}" if run.stage is not None else "")
    source = run.source if getattr(inheritance, "needs_source", True) else None
    achieved = metrics.get("sparsity/stage_achieved", metrics.get("sparsity/achieved"))
    if source is None or achieved is None:
        return {"title": f"{label}: not inherited (against its own config)"}
    whose = "the teacher" if run.stage is None or run.stage.source == "teacher" else "the previous stage's model"
    title = f"{label}: {achieved:.1%} of {whose} pruned"
    if "sparsity/stage_achieved" in metrics and whose != "the teacher":
        title += f" ({metrics['sparsity/achieved']:.1%} of the teacher)"
    return {"source": source, "layer_map": getattr(inheritance, "layer_map", None), "title": title}


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the lines of ``metrics.jsonl`` up to ``step`` (what a resumed run logs again is cut)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:  # a line torn by the kill
            continue
    atomic_write_text(path, "".join(line + "\n" for line in kept))
