"""One run, end to end: config -> teacher, student, data, training, export, evaluation, result row."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress import distributed
from compress.config import RunConfig, dump_config
from compress.config.validate import inheritance_context, loss_weight_keys, schedule_context
from compress.fileio import atomic_write_text
from compress.models import load_model
from compress.models.forward import context_length_of, embed_dim, tokenizer_for
from compress.models.params import parameter_report
from compress.precision import resolve_device, resolve_precision
from compress.registry import INHERITANCE, LOSSES, SCHEDULES
from compress.results import STATUS_COMPLETED, STATUS_FAILED, STATUS_INTERRUPTED, make_row, write_result
from compress.rundir import owned_run_dir
from compress.teacher import OnlineTeacher, freeze
from compress.train import LossTerm, Trainer

log = logging.getLogger(__name__)


class RunError(RuntimeError):
    """The run's configuration cannot be executed as written."""


def run_dir_for(cfg: RunConfig) -> Path:
    """``output.dir / (output.run_name or NAME-RUNID)``."""
    return Path(cfg.output.dir) / (cfg.output.run_name or f"{cfg.name}-{cfg.run_id()}")


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


def _prepare(cfg: RunConfig):
    seed_everything(cfg.seed)
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    teacher = None
    if cfg.teacher is not None:
        t = cfg.teacher
        teacher = freeze(load_model(t.model, pretrained=t.pretrained, force_quick_gelu=t.force_quick_gelu))
    inheritance = INHERITANCE.build(cfg.inheritance, context=inheritance_context(cfg))
    student = build_student(cfg, inheritance, teacher)
    if teacher is not None and context_length_of(teacher) != context_length_of(student):
        raise RunError(
            f"teacher and student context lengths differ ({context_length_of(teacher)} vs "
            f"{context_length_of(student)}); both read the same tokens"
        )
    return device, precision, teacher, inheritance, student.to(device)


class RunInterrupted(BaseException):
    """SIGTERM arrived during a run (a scheduler stopping the job, ``kill``)."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into :class:`RunInterrupted` while the run executes (main thread only), so
    the run can still write its ``interrupted`` row; the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise RunInterrupted(f"stopped by signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def refuse_multiple_processes() -> None:
    """Multi-GPU (data-parallel) training is not built: several processes would each train
    their own replica and rank 0's would be exported. Stop before anything is computed."""
    env_world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if distributed.world_size() > 1 or env_world > 1:
        raise RunError(
            f"this run was started as {max(distributed.world_size(), env_world)} processes, but multi-process "
            "(DistributedDataParallel) training is not built yet: start one process (one GPU)"
        )


def sparsity_metrics(inheritance: Any, source: nn.Module | None, exported: nn.Module) -> dict[str, Any]:
    """Achieved sparsity of the exported student against its source, counted TinyCLIP's way
    (vision tower + text tower without the token embedding), and the strategy's target if it
    has one. ``sparsity/missed`` is true when the achieved value is more than
    :data:`SPARSITY_TOLERANCE` below the target."""
    if source is None:
        return {}
    full, kept = parameter_report(source), parameter_report(exported)
    prunable_full = full["vision"] + full["text"]
    achieved = 1.0 - (kept["vision"] + kept["text"]) / prunable_full
    out: dict[str, Any] = {"sparsity/achieved": round(achieved, 6)}
    target = getattr(inheritance, "target_sparsity", None)
    if target is not None:
        out["sparsity/target"] = float(target)
        out["sparsity/missed"] = achieved < float(target) - SPARSITY_TOLERANCE
    return out


#: how far below its target an automatically pruned student may end before the row says ``missed``
SPARSITY_TOLERANCE = 0.02


def run_experiment(cfg: RunConfig) -> dict[str, Any]:
    """Run ``cfg`` and return its result row; the row is also written to ``result.json``,
    for a failed run too (status ``failed`` and the error) and for one stopped by SIGTERM or
    Ctrl-C (status ``interrupted``, then the interruption is raised again). Resume is not
    built: a started run always begins at step 0, with a fresh ``metrics.jsonl``.

    The run directory is held for the whole run (:func:`compress.rundir.owned_run_dir`): a
    second process, or another config reusing the folder, raises ``RunDirError`` and touches
    nothing there."""
    run_dir = run_dir_for(cfg)
    if not distributed.is_main_process():
        return _run_in(cfg, run_dir)
    with owned_run_dir(run_dir, cfg.run_id()):
        return _run_in(cfg, run_dir)


def _run_in(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    from compress.data.pipeline import train_batches
    from compress.evaluation.run_eval import build_eval_sets, evaluate_prepared
    from compress.models.export import save_model
    from compress.models.nonuniform import write_structure

    started = time.time()
    main = distributed.is_main_process()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # no resume yet: one series per run
    metrics: dict[str, Any] = {}

    def row_for(status: str, error: BaseException | None = None) -> dict[str, Any]:
        return make_row(run_id=cfg.run_id(), name=cfg.name, status=status, config=cfg.to_dict(), started=started,
                        metrics=metrics, error=error)

    try:
        with sigterm_raises():
            refuse_multiple_processes()
            device, precision, teacher, inheritance, student = _prepare(cfg)
            # what `auto` resolved to on this machine (the run id holds the config, not the machine)
            metrics.update({"train/device": str(device), "train/precision": precision.name})
            # evaluation sets are built before training, so a wrong path fails now, not after hours
            eval_sets = build_eval_sets(cfg.eval, cfg.data, student, tokenizer_for(student)) if main else None
            losses = build_losses(cfg, student, teacher)
            for term in losses:
                term.module.to(device)
            needs = {n for term in losses for n in term.module.needs}
            uses_teacher = any(term.module.needs_teacher for term in losses)
            batches, data_stats = train_batches(cfg, student, teacher if uses_teacher else None, device)
            lr = SCHEDULES.build(cfg.schedules["lr"], context=schedule_context(cfg, "lr"))
            trainer = Trainer(
                cfg.train,
                student,
                losses,
                lr,
                batches,
                precision,
                teacher=OnlineTeacher(teacher, precision, needs) if teacher is not None else None,
                inheritance=inheritance,
                run_dir=run_dir if main else None,
                save_checkpoints=cfg.output.save_checkpoint,
            )
            try:
                summary = trainer.fit()
            finally:
                metrics.update(data_stats.as_metrics())
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
            metrics.update(sparsity_metrics(inheritance, teacher, exported))
            if metrics.get("sparsity/missed"):
                print(
                    f"clip-compress: warning: run {cfg.name} missed its sparsity target: "
                    f"{metrics['sparsity/achieved']:.1%} pruned for a target of {metrics['sparsity/target']:.1%}",
                    file=sys.stderr,
                )
            if main:
                metrics["export/path"] = str(save_model(exported, run_dir / "model"))
                write_structure(exported, run_dir)
                metrics.update(
                    evaluate_prepared(exported, eval_sets, cfg.eval, device, precision.name, cfg.train.progress)
                )
        row = row_for(STATUS_COMPLETED)
    except (KeyboardInterrupt, RunInterrupted) as interruption:
        if main:
            write_result(run_dir, row_for(STATUS_INTERRUPTED, interruption))
        print(f"clip-compress: run {cfg.name} interrupted (see {run_dir / 'result.json'})", file=sys.stderr)
        raise
    except Exception as error:  # the row records the failure; the caller decides what to do with it
        row = row_for(STATUS_FAILED, error)
        print(f"clip-compress: run {cfg.name} failed: {row['error']} (see {run_dir / 'result.json'})", file=sys.stderr)
    if main:
        write_result(run_dir, row)
    return row
