"""One run, end to end: a config's Recipe -> its stages executed in order (:mod:`compress.stage`), result rows.

This module orchestrates: it holds the run directory, resumes or skips stages, and writes the run's (and each
stage's) row for every outcome (completed, failed, interrupted). What one stage does is :mod:`compress.stage`.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress import distributed, stopping
from compress.checkpoint import CheckpointWriteError, config_hash, latest_checkpoint, remove_checkpoints
from compress.config import ConfigError, RunConfig, dump_config
from compress.config.stages import ResolvedStage
from compress.fileio import NO_SPACE, atomic_write_text, write_failure
from compress.models import load_model
from compress.precision import Precision, run_device
from compress.recipe import Recipe
from compress.recipe import run_dir_for as run_dir_for  # where callers of run_experiment look for it
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
    MODEL_DIR,
    RUN_OUTPUTS,
    check_writable,
    owned_run_dir,
    stage_dir,
    unwritable,
)
from compress.stage import StageRun, run_stage, seed_everything, stage_run
from compress.stopping import RunInterrupted, StoppedAtStep
from compress.teacher import load_teachers
from compress.tracking import require_trackers

log = logging.getLogger(__name__)


def check_batch_split(recipe: Recipe, world: int) -> None:
    """``train.batch_size`` is the global batch: it must split into equal per-process micro-batches."""
    for stage in recipe.stages:
        train = stage.cfg.train
        where = f"stages[{stage.index}] ({stage.name}): " if recipe.staged else ""
        if train.batch_size % (world * train.accum_steps):
            raise ConfigError(
                f"{where}train.batch_size {train.batch_size} is the global batch: it must be a multiple of "
                f"{world} process(es) x train.accum_steps {train.accum_steps} = {world * train.accum_steps}"
            )


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
    recipe = Recipe.of(cfg)
    require_trackers(sorted({name for stage in recipe.stages for name in stage.cfg.train.report_to}))
    run_dir = recipe.run_dir
    device, precision = run_device(cfg)
    with distributed.process_group(device), contextlib.ExitStack() as held:
        check_batch_split(recipe, distributed.world_size())

        def prepare() -> None:  # rank 0 holds the directory and clears it before any rank reads it
            check_writable(run_dir)
            try:
                held.enter_context(owned_run_dir(run_dir, recipe.run_id))
                run_dir.mkdir(parents=True, exist_ok=True)
                distributed.clear_failures(run_dir)
                if force:
                    start_fresh(run_dir)
                atomic_write_text(run_dir / CONFIG_FILE, dump_config(cfg))
            except OSError as error:  # a full disk, or what only writing shows: no row can be written yet
                raise unwritable(run_dir, error) from error

        distributed.main_first(prepare)
        return _run_in(recipe, run_dir, device, precision)


def start_fresh(run_dir: Path) -> None:
    """Remove checkpoints, stage folders, metrics, result, model, reports and TensorBoard events of an earlier
    attempt (:data:`RUN_OUTPUTS`); the W&B runs stay (they may not be synced yet)."""
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


class _Attempt:
    """One attempt at a run: its stages (None: a run without stages), the stage in progress, the metrics so far,
    and the rows it writes (the stage's, and the run's)."""

    def __init__(self, recipe: Recipe, run_dir: Path) -> None:
        self.recipe, self.cfg, self.run_dir = recipe, recipe.cfg, run_dir
        self.started = time.time()
        self.main = distributed.is_main_process()
        self.stages: list[ResolvedStage | None] = list(recipe.stages) if recipe.staged else [None]
        self.metrics: dict[str, Any] = {}
        self.current: StageRun | None = None

    def directory(self, stage: ResolvedStage | None) -> Path:
        return stage_dir(self.run_dir, stage.dir_name if stage is not None else None)

    def check_owners(self) -> None:
        """Another run's or another config's checkpoint: refused before anything is loaded."""
        for stage in self.stages:
            directory = self.directory(stage)
            checkpoint = latest_checkpoint(directory) if not _completed(directory, stage) else None
            if checkpoint is not None:
                checkpoint.check_owner(self.recipe.run_id, config_hash(self.cfg))

    def run_stages(self, teachers: list[nn.Module], device: torch.device, precision: Precision) -> None:
        """Each stage in order: a completed one is kept (its model is the next one's source), the others run.
        ``teachers``: every teacher; the first is each stage's teacher source."""
        teacher = teachers[0] if teachers else None
        previous: nn.Module | None = None
        for stage in self.stages:
            directory = self.directory(stage)
            if _completed(directory, stage):
                self.metrics = dict(read_result(directory)["metrics"])  # its model is the next stage's source
                previous = load_model(str(directory / MODEL_DIR))
                if self.main and not self.cfg.output.keep_checkpoints:  # a kill may have come before they went
                    remove_checkpoints(directory)
                log.info("stage %s already completed: its exported model is the next stage's source", stage.dir_name)
                continue
            self.metrics = {}
            self.current = stage_run(self.cfg, stage, directory, teacher, previous)
            run_stage(self.current, self.recipe, teachers, device, precision, self.metrics)
            if stage is not None and stage is not self.stages[-1]:
                self.write_rows(STATUS_COMPLETED, run_row=False)
                _after_success(self.current)
                self.current = None  # its row is final: a later failure must not overwrite it
                # the next stage starts from this stage's exported model as saved (on every rank, once its node
                # sees rank 0's files)
                distributed.wait_for_main_files(directory / MODEL_DIR)
                previous = load_model(str(directory / MODEL_DIR))

    def row_for(self, status: str, error: BaseException | None = None, step: int | None = None) -> dict[str, Any]:
        current = self.current
        stage = current.stage if current is not None else self.stages[-1] if status == STATUS_COMPLETED else None
        extra = {"stage": stage.dir_name} if stage is not None else {}
        if step is not None:  # an interrupted run: the optimizer steps its checkpoint holds
            extra["step"] = step
        return make_row(run_id=self.recipe.run_id, name=self.cfg.name, status=status, config=self.cfg.to_dict(),
                        started=self.started, metrics=self.metrics, error=error, extra=extra)

    def write_rows(self, status: str, error: BaseException | None = None, run_row: bool = True,
                   step: int | None = None) -> dict[str, Any]:
        """The current stage's row (a staged run) and, unless a stage finished before the last, the run's."""
        row = self.row_for(status, error, step)
        current = self.current
        if self.main and current is not None and current.stage is not None:
            stage_row = make_row(run_id=self.recipe.run_id, name=self.cfg.name, status=status,
                                 config=current.cfg.to_dict(), started=self.started, metrics=self.metrics,
                                 error=error, extra={"step": step} if step is not None else None)
            write_result(current.directory, stage_row)
        if self.main and run_row:
            write_result(self.run_dir, row)
        return row

    def write_final_rows(self, status: str, error: BaseException | None = None,
                         step: int | None = None) -> tuple[dict[str, Any], str]:
        """:meth:`write_rows` after a failure or a stop, and where the one line that says so sends the user: a
        row that cannot be written (the disk is full) is said there instead, and the run's outcome still
        reaches the caller."""
        try:
            return self.write_rows(status, error, step=step), f"see {self.run_dir / RESULT_FILE}"
        except OSError as unwritten:
            return self.row_for(status, error, step), (
                f"the {status} row could not be written to {self.run_dir / RESULT_FILE}: "
                f"{write_failure(unwritten) or unwritten}")

    def interrupted(self, interruption: BaseException) -> None:
        """The interrupted rows, and one line saying how to resume (a failing peer may be why: srun ends the step)."""
        step = interruption.step if isinstance(interruption, StoppedAtStep) else None
        cause = distributed.failure_with_causes(self.run_dir, interruption, wait_s=0) if self.main else interruption
        _, where = self.write_final_rows(STATUS_INTERRUPTED, cause, step)
        if self.main and step is not None:
            print(f"clip-compress: run {self.cfg.name} {interruption}: the same command resumes it ({where})",
                  file=sys.stderr)
        elif step is None:
            print(f"clip-compress: run {self.cfg.name} interrupted ({where})", file=sys.stderr)

    def failed(self, error: Exception) -> dict[str, Any]:
        """The failed rows and the one line that says so (the row records the failure; the caller decides)."""
        distributed.record_failure(self.run_dir, error)
        if self.main:
            error = distributed.failure_with_causes(self.run_dir, error)
        row, where = self.write_final_rows(STATUS_FAILED, error)
        name = self.cfg.name
        if isinstance(error, CheckpointWriteError):  # it says what and which checkpoint is kept
            print(f"clip-compress: error: run {name}: {error} ({where})", file=sys.stderr)
        elif write_failure(error) == NO_SPACE:  # the file system's fault, not the run's
            print(f"clip-compress: error: run {name}: {NO_SPACE} ({row['error']}) ({where})", file=sys.stderr)
        else:
            print(failed_line(name, row["error"], where), file=sys.stderr)
        return row


def _run_in(recipe: Recipe, run_dir: Path, device: torch.device, precision: Precision) -> dict[str, Any]:
    attempt = _Attempt(recipe, run_dir)
    attempt.check_owners()
    try:
        with stopping.stop_signals():
            seed_everything(recipe.cfg.seed)  # a random-init teacher (tests) is the same in every attempt
            teachers = load_teachers(recipe.cfg)
            attempt.run_stages(teachers, device, precision)
        row = attempt.write_rows(STATUS_COMPLETED)
        if attempt.current is not None:
            _after_success(attempt.current)
    except (KeyboardInterrupt, RunInterrupted) as interruption:
        attempt.interrupted(interruption)
        raise
    except Exception as error:  # the row records the failure; the caller decides what to do with it
        row = attempt.failed(error)
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


def _completed(directory: Path, stage: ResolvedStage | None) -> bool:
    """A stage of a staged run whose row says completed (kept when the run is started again)."""
    if stage is None:
        return False
    done = read_result(directory)
    return done is not None and done.get("status") == STATUS_COMPLETED


def _after_success(run: StageRun) -> None:
    """Once a stage's row says completed, its checkpoints go (unless ``output.keep_checkpoints``)."""
    if distributed.is_main_process() and not run.cfg.output.keep_checkpoints:
        remove_checkpoints(run.directory)
