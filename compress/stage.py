"""One stage of a run executed: its student built (or rebuilt from its checkpoint), trained, exported, evaluated.

A run without stages is one stage. :mod:`compress.run` orchestrates the stages of a run and writes its rows;
this module runs one of them and fills the row's metrics as it goes, so that a failure keeps what was measured.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress import distributed, stopping
from compress.checkpoint import (
    Checkpoint,
    CheckpointError,
    config_hash,
    latest_checkpoint,
    rebuild_student,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from compress.config import RunConfig
from compress.config.stages import ResolvedStage
from compress.fileio import atomic_write_text
from compress.models import load_model
from compress.models.forward import context_length_of, tokenizer_for
from compress.models.params import parameter_report, prunable_count
from compress.models.towers import TOWERS
from compress.precision import Precision
from compress.recipe import Recipe, pruned_towers, run_dir_for, with_source_fraction
from compress.rundir import METRICS_FILE, MODEL_DIR, RunDir
from compress.tracking import Trackers, open_trackers
from compress.train import Trainer, TrainSummary

#: stage k draws its data order and random states from ``seed + k * STAGE_SEED_STRIDE``
STAGE_SEED_STRIDE = 7919
#: how far from its target (either way) an automatically pruned student may end before the row says ``missed``
SPARSITY_TOLERANCE = 0.02


class RunError(RuntimeError):
    """The run's configuration cannot be executed as written."""


@dataclass
class StageRun:
    """One stage to execute: its config and folder, where its weights come from, its seed."""

    cfg: RunConfig
    directory: Path
    stage: ResolvedStage | None
    source: nn.Module | None
    seed: int


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def stage_run(
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


def load_student(run: StageRun, inheritance: Any, checkpoint: Checkpoint | None) -> nn.Module:
    """The stage's student: from the checkpoint when resuming (the strategy rebuilds what it made of the student
    from its record, :meth:`~compress.plugins.Inheritance.restore`; else a masked student, which the record says,
    is built by the strategy as on a fresh start, and any other is a plain student of the recorded structure, no
    strategy code involved), else built and filled by the strategy. The checkpoint's weights are loaded strictly."""
    if checkpoint is None:
        return build_student(run.cfg, inheritance, run.source)
    record = checkpoint.student_record()
    student = inheritance.restore(record, run.source)
    if student is None and record.get("masked"):
        student = build_student(run.cfg, inheritance, run.source)
    if student is not None:
        student.load_state_dict(checkpoint.student_state(), strict=True)
        return student
    student = rebuild_student(record)
    student.load_state_dict(checkpoint.student_state(), strict=True, assign=True)
    return student


def prunable_parameters(model: nn.Module) -> int:
    """TinyCLIP's count: the vision tower and the text tower without the token embedding."""
    report = parameter_report(model)
    return report["vision"] + report["text"]


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
    towers = tuple(inheritance.towers)
    achieved = 1.0 - prunable_count(exported, towers) / prunable_count(teacher, towers)
    out: dict[str, Any] = {"sparsity/achieved": round(achieved, 6)}
    if set(towers) != set(TOWERS):
        out["sparsity/towers"] = "+".join(towers)
        out["sparsity/achieved_both"] = round(1.0 - prunable_parameters(exported) / prunable_parameters(teacher), 6)
    target = inheritance.pruning_target()
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


def report_reference(run: StageRun, run_cfg: RunConfig, inheritance: Any, metrics: dict[str, Any]) -> dict[str, Any]:
    """What a stage's structure report compares its exported student with, and its title: the model it
    inherited from (the teacher, or the previous stage's model) with the strategy's ``layer_map`` where it
    has one, titled with the run and its sparsity against that source (TinyCLIP's count, as in the row);
    a strategy that does not read the source (``none``) is shown against its own config."""
    label = run_dir_for(run_cfg).name + (f" stage {run.stage.dir_name}" if run.stage is not None else "")
    source = run.source if inheritance.needs_source else None
    achieved = metrics.get("sparsity/stage_achieved", metrics.get("sparsity/achieved"))
    if source is None or achieved is None:
        return {"title": f"{label}: not inherited (against its own config)"}
    whose = "the teacher" if run.stage is None or run.stage.source == "teacher" else "the previous stage's model"
    title = f"{label}: {achieved:.1%} of {whose} pruned"
    if "sparsity/stage_achieved" in metrics and whose != "the teacher":
        title += f" ({metrics['sparsity/achieved']:.1%} of the teacher)"
    return {"source": source, "layer_map": inheritance.layer_map, "title": title}


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


# -- one stage --------------------------------------------------------------------------------
def stage_checkpoint(directory: Path, device: torch.device, precision: Precision) -> Checkpoint | None:
    """The stage's newest checkpoint (its owner was checked when the run started), refused when it was written
    in another precision or by another number of processes than this attempt's."""
    checkpoint = latest_checkpoint(directory)
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
    return checkpoint


def _setting_metrics(run: StageRun, recipe: Recipe, device: torch.device, precision: Precision) -> dict[str, Any]:
    """The stage, and what ``auto`` resolved to on this machine (the run id holds the config, not the machine)."""
    metrics: dict[str, Any] = {}
    if run.stage is not None:
        metrics.update({"stage/index": run.stage.index, "stage/name": run.stage.name,
                        "stage/source": run.stage.source, "stage/count": len(recipe.cfg.stages)})
    metrics.update({"train/device": str(device), "train/precision": precision.name})
    world = distributed.world_size()
    metrics.update({"dist/world_size": world, "dist/batch_per_process": run.cfg.train.batch_size // world})
    cache = run.cfg.teacher_cache
    if cache is not None:  # where the teacher's outputs came from: a table can group the runs of one cache
        from compress.teacher_cache.identity import cache_id_of

        metrics.update({"teacher/source": cache.mode, "teacher/cache_id": cache_id_of(run.cfg),
                        "teacher/views": cache.num_augmentations})
    return metrics


def _checkpoint_writer(run: StageRun, recipe: Recipe, precision: Precision, loader: Any,
                       inheritance: Any) -> Callable[[Trainer], None]:
    """What the trainer calls at a checkpoint, on every rank: each one's data position and random states go to
    rank 0, which writes (a failure there, a full disk, reaches every rank instead of leaving them waiting)."""
    meta = {"run_id": recipe.run_id, "config_sha": config_hash(recipe.cfg),
            "stage": run.stage.index if run.stage is not None else 0, "precision": precision.name,
            "world_size": distributed.world_size()}
    if run.cfg.teacher_cache is not None:
        from compress.teacher_cache.identity import cache_id_of

        meta["teacher_cache_id"] = cache_id_of(run.cfg)

    def write(trainer: Trainer) -> None:
        ranks = distributed.gather_objects({"data": loader.state_dict(), "rng": rng_state()})

        def save() -> None:
            state = {"trainer": trainer.state_dict(), "ranks": ranks}
            write_checkpoint(run.directory, trainer.step, trainer.student, state, meta,
                             keep_every=run.cfg.output.keep_every, strategy_record=inheritance.record(trainer.student))

        distributed.main_first(save)

    return write


def _resume(trainer: Trainer, checkpoint: Checkpoint, loader: Any, run: StageRun) -> None:
    """The trainer, this rank's data position and random states as the checkpoint holds them; ``metrics.jsonl``
    cut back to its step."""
    state = checkpoint.state()
    trainer.load_state_dict(state["trainer"])
    ranks = state.get("ranks") or [{"data": state["data"], "rng": state["rng"]}]  # one process, older format
    mine = ranks[distributed.rank()]
    loader.load_state_dict(mine["data"])
    if distributed.is_main_process():
        truncate_metrics(run.directory / METRICS_FILE, checkpoint.step)
    set_rng_state(mine["rng"])
    print(f"clip-compress: resuming {run.cfg.name} from {checkpoint.path} (step {checkpoint.step} of "
          f"{run.cfg.train.steps})", file=sys.stderr)


def stage_trackers(run: StageRun, recipe: Recipe, checkpoint: Checkpoint | None) -> Trackers:
    """The stage's trackers (``train.report_to``), on rank 0: the run id as their run id (a stage's: the run id and
    the stage's folder name), grouped by the run id, resumed at the checkpoint's step."""
    if not distributed.is_main_process():
        return Trackers([])
    stage = run.stage
    suffix = f"-{stage.dir_name}" if stage is not None else ""
    return open_trackers(run.cfg.train.report_to, run.directory, run_dir=recipe.run_dir,
                         run_id=recipe.run_id + suffix, name=run.cfg.name + suffix,
                         config={"run_id": recipe.run_id, **run.cfg.to_dict()},
                         resumed_at=checkpoint.step if checkpoint is not None else None, group=recipe.run_id)


def _summary_metrics(summary: TrainSummary) -> dict[str, Any]:
    return {
        **{f"train/{k}": v for k, v in summary.final_terms.items()},
        "train/steps": summary.steps,
        "train/nonfinite_steps": summary.nonfinite_steps,
        "train/samples_per_s": summary.samples_per_s,
        "train/duration_s": summary.duration_s,
    }


def _warn_missed(name: str, metrics: dict[str, Any]) -> None:
    if metrics.get("sparsity/missed"):
        how = "overshot" if metrics["sparsity/overshoot"] else "fell short of"
        print(
            f"clip-compress: warning: run {name} {how} its sparsity target: "
            f"{metrics['sparsity/achieved']:.1%} pruned for a target of {metrics['sparsity/target']:.1%} "
            f"({100 * metrics['sparsity/error']:+.1f} points)",
            file=sys.stderr,
        )


def calibration_batches(run: StageRun, count: int, device: torch.device) -> list[dict[str, Any]]:
    """The stage's first ``count`` training micro-batches, prepared for its source model, from a loader of their
    own (the run's: same data, seed and order): the run's loader is not built yet and the random states are put
    back as they were, so the run trains on the same batches as one that drew none. Cost: ``count`` micro-batches
    read and decoded once more (at the ViT-B/32 recipe, 8 x 256 images, seconds)."""
    from compress.data.pipeline import train_batches

    if count <= 0 or run.source is None:
        return []
    saved = rng_state()
    try:
        stream, _stats = train_batches(dataclasses.replace(run.cfg, seed=run.seed), run.source, None, device)
        return [next(stream) for _ in range(count)]
    finally:
        set_rng_state(saved)


def prepare_inheritance(run: StageRun, inheritance: Any) -> None:
    """A fresh start's calibration seam (:meth:`compress.plugins.Inheritance.prepare`): rank 0 first (it scores the
    source and writes the scores into the stage's folder), then the others (which read them). The random states
    are put back as they were after it: the run trains as one whose strategy prepares nothing. Called for every
    strategy that reads a source (the default :meth:`~compress.plugins.Inheritance.prepare` does nothing)."""
    from compress.plugins import Calibration

    if run.source is None:
        return
    source_device = next(run.source.parameters()).device
    cache: dict[str, list[dict[str, Any]]] = {}

    def batches() -> list[dict[str, Any]]:
        if "batches" not in cache:
            cache["batches"] = calibration_batches(run, inheritance.calibration_batches(), source_device)
        return cache["batches"]

    scores = RunDir(run.directory).importance_scores
    world = distributed.world_size()
    layout = {"micro_batch": run.cfg.train.micro_batch(world), "world_size": world}
    saved = rng_state()
    try:
        distributed.main_first(lambda: inheritance.prepare(Calibration(batches, scores, source_device, True,
                                                                       **layout), run.source))
        if not distributed.is_main_process():
            inheritance.prepare(Calibration(batches, scores, source_device, False, **layout), run.source)
    finally:
        set_rng_state(saved)
        cache.clear()
        if source_device.type == "cuda":  # the calibration's activations and gradients go back to the device
            torch.cuda.empty_cache()


def _student(run: StageRun, inheritance: Any, checkpoint: Checkpoint | None, teacher: nn.Module | None,
             device: torch.device) -> nn.Module:
    student = load_student(run, inheritance, checkpoint)
    if teacher is not None and context_length_of(teacher) != context_length_of(student):
        raise RunError(
            f"teacher and student context lengths differ ({context_length_of(teacher)} vs "
            f"{context_length_of(student)}); both read the same tokens"
        )
    return student.to(device)


def run_stage(run: StageRun, recipe: Recipe, teachers: Sequence[nn.Module], device: torch.device,
              precision: Precision, metrics: dict[str, Any]) -> None:
    """Train, export and evaluate one stage (resuming from its checkpoint); fills ``metrics`` as it goes, so a
    failure keeps what was measured. ``teachers``: every teacher (:func:`compress.teacher.load_teachers`); the first
    is the one students inherit from and sparsity is counted against, an ensemble's members all feed the loss."""
    from compress.data.pipeline import train_batches
    from compress.evaluation.run_eval import build_eval_sets, evaluate_prepared
    from compress.models.export import save_model
    from compress.models.nonuniform import write_structure

    cfg, main = run.cfg, distributed.is_main_process()
    teacher = teachers[0] if teachers else None
    checkpoint = stage_checkpoint(run.directory, device, precision)
    metrics.update(_setting_metrics(run, recipe, device, precision))
    seed_everything(run.seed)
    inheritance = Recipe.inheritance(cfg)
    if checkpoint is None:
        prepare_inheritance(run, inheritance)
    student = _student(run, inheritance, checkpoint, teacher, device)
    # evaluation sets are built before training, so a wrong path fails now, not after hours
    eval_sets = build_eval_sets(cfg.eval, cfg.data, student, tokenizer_for(student)) if main else None
    losses = Recipe.losses(cfg, student, teacher)
    for term in losses:
        term.module.to(device)
    needs = {n for term in losses for n in term.module.needs}
    uses_teacher = any(term.module.needs_teacher and term.ever_active(cfg.train.steps) for term in losses)
    from compress.teacher_cache.for_run import check_cache_of_checkpoint, open_teacher_cache

    check_cache_of_checkpoint(checkpoint, cfg)
    store = open_teacher_cache(cfg) if uses_teacher else None  # without: the same views, drawn from their seed
    batches, data_stats = train_batches(dataclasses.replace(cfg, seed=run.seed), student,
                                        list(teachers) if uses_teacher else None, device, store)
    trainer = Trainer(
        cfg.train, student, losses, Recipe.schedule(cfg, "lr"), batches, precision,
        teacher=(Recipe.teacher_source(cfg, list(teachers) or None, precision, needs, store, student=student)
                 if uses_teacher else None),
        inheritance=inheritance, run_dir=run.directory if main else None,
        on_checkpoint=(_checkpoint_writer(run, recipe, precision, data_stats.loader, inheritance)
                       if cfg.output.save_checkpoint else None),
        seed=run.seed, should_stop=stopping.agreed, replay=data_stats.replay,
    )
    if checkpoint is not None:
        _resume(trainer, checkpoint, data_stats.loader, run)
    elif main:
        (run.directory / METRICS_FILE).unlink(missing_ok=True)  # a fresh start: one series per run
    trackers = stage_trackers(run, recipe, checkpoint)
    trainer.on_log = trackers.log  # the record that goes to metrics.jsonl
    with trackers:  # closed at the end, and on a failure or a stop
        try:
            with stopping.deferred():  # a stop signal ends training after the step in progress, with a checkpoint
                summary = trainer.fit()
        finally:
            metrics.update(data_stats.as_metrics())  # this process's counts if training failed
        metrics.update(data_stats.as_metrics(all_ranks=True))
        metrics.update(_summary_metrics(summary))
        exported = inheritance.export(trainer.student).eval()
        metrics.update(sparsity_metrics(inheritance, teacher, exported, run))
        _warn_missed(cfg.name, metrics)

        def finish() -> None:  # rank 0, while the others wait (an error there reaches every rank)
            metrics["export/path"] = str(save_model(exported, run.directory / MODEL_DIR))
            write_structure(exported, run.directory, **report_reference(run, recipe.cfg, inheritance, metrics))
            metrics.update(evaluate_prepared(exported, eval_sets, cfg.eval, device, precision.name,
                                             cfg.train.progress))

        distributed.main_first(finish)  # after it, the model is on disk: the next stage loads it on every rank
        trackers.summary(metrics)
