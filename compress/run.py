"""One run, end to end: config -> teacher, student, data, training, export, evaluation, result row."""

from __future__ import annotations

import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress import distributed
from compress.config import RunConfig, dump_config
from compress.fileio import atomic_write_text
from compress.models import load_model
from compress.models.forward import context_length_of, embed_dim
from compress.precision import resolve_device, resolve_precision
from compress.registry import INHERITANCE, LOSSES, SCHEDULES
from compress.results import STATUS_COMPLETED, STATUS_FAILED, make_row, write_result
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
    context = {"student_embed_dim": embed_dim(student)}
    if teacher is not None:
        context["teacher_embed_dim"] = embed_dim(teacher)
    terms = []
    for spec in cfg.losses:
        params = dict(spec)
        weight = float(params.pop("weight", 1.0))
        terms.append(LossTerm(params["name"], weight, LOSSES.build(params, context=context)))
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
    inheritance = INHERITANCE.build(cfg.inheritance)
    student = build_student(cfg, inheritance, teacher)
    if teacher is not None and context_length_of(teacher) != context_length_of(student):
        raise RunError(
            f"teacher and student context lengths differ ({context_length_of(teacher)} vs "
            f"{context_length_of(student)}); both read the same tokens"
        )
    if cfg.train.grad_checkpointing and hasattr(student, "set_grad_checkpointing"):
        student.set_grad_checkpointing(True)
    return device, precision, teacher, inheritance, student.to(device)


def run_experiment(cfg: RunConfig, force: bool = False) -> dict[str, Any]:
    """Run ``cfg`` and return its result row; the row is also written to ``result.json``,
    for a failed run too (status ``failed`` and the error)."""
    from compress.data.pipeline import train_batches
    from compress.evaluation.run_eval import evaluate_for_run
    from compress.models.export import save_model
    from compress.models.nonuniform import write_structure

    run_dir = run_dir_for(cfg)
    started = time.time()
    main = distributed.is_main_process()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
        if force:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    state: dict[str, Any] = {}
    try:
        device, precision, teacher, inheritance, student = _prepare(cfg)
        losses = build_losses(cfg, student, teacher)
        for term in losses:
            term.module.to(device)
        needs = {n for term in losses for n in term.module.needs}
        batches, data_stats = train_batches(cfg, student, device)
        state["data_stats"] = data_stats
        lr = SCHEDULES.build(cfg.schedules["lr"], context={"base_value": cfg.train.lr, "total_steps": cfg.train.steps})
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
        )
        summary = trainer.fit()
        exported = inheritance.export(trainer.student).eval()
        metrics: dict[str, Any] = {f"train/{k}": v for k, v in summary.final_terms.items()}
        metrics.update(
            {
                "train/steps": summary.steps,
                "train/nonfinite_steps": summary.nonfinite_steps,
                "train/samples_per_s": summary.samples_per_s,
                "train/duration_s": summary.duration_s,
            }
        )
        if main:
            metrics["export/path"] = str(save_model(exported, run_dir / "model"))
            write_structure(exported, run_dir)
            metrics.update(evaluate_for_run(cfg, exported, device, precision))
        metrics.update(data_stats.as_metrics())
        row = make_row(
            run_id=cfg.run_id(), name=cfg.name, status=STATUS_COMPLETED, config=cfg.to_dict(),
            started=started, metrics=metrics,
        )
    except Exception as error:  # the row records the failure; the caller decides what to do with it
        stats = state.get("data_stats")
        row = make_row(
            run_id=cfg.run_id(), name=cfg.name, status=STATUS_FAILED, config=cfg.to_dict(), started=started,
            metrics=stats.as_metrics() if stats is not None else {}, error=error,
        )
        print(f"clip-compress: run {cfg.name} failed: {row['error']} (see {run_dir / 'result.json'})", file=sys.stderr)
    if main:
        write_result(run_dir, row)
    return row
