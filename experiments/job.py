"""The submitit job: a picklable callable that runs one config given as a plain dict."""

from __future__ import annotations

import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from compress.config import RunConfig
from compress.recipe import config_from_dict, run_id_of
from compress.results import STATUS_COMPLETED, STATUS_FAILED, read_result
from compress.run import run_dir_for
from compress.rundir import RunDirBusy
from compress.stage import RunError
from compress.stopping import StoppedAtStep
from experiments.backends import restart_count

#: the row status (never written to ``result.json``) of a run whose directory another live process holds
RUNNING_ELSEWHERE = "running elsewhere"


def export_task_environment() -> None:
    """Inside a submitit job of several tasks (one per GPU), export torchrun's variables (RANK,
    WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) for ``compress.distributed``,
    which starts the process group. ``CUDA_VISIBLE_DEVICES`` is left alone: each task uses
    ``cuda:LOCAL_RANK``, as under torchrun. Outside submitit, or with one task, nothing changes."""
    import submitit

    try:
        env = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job
        return
    if env.num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def own_result(cfg: RunConfig) -> dict[str, Any] | None:
    """The row in the run's ``result.json`` if it is this run's (same run id), else None."""
    row = read_result(run_dir_for(cfg))
    return row if row is not None and row.get("run_id") == run_id_of(cfg) else None


def completed_row(cfg: RunConfig) -> dict[str, Any] | None:
    """The run's own row if it says completed, else None (a run to start or resume)."""
    row = own_result(cfg)
    return row if row is not None and row.get("status") == STATUS_COMPLETED else None


def write_reports(run_dir: Path) -> None:
    """Human-readable companions of a run: the structure table and heat-map (kept heads and
    MLP neurons per layer) next to ``result.json``."""
    from analysis.structure_report import write_structure_report
    from compress.rundir import STAGES_DIR, STRUCTURE_FILE

    for folder in [run_dir, *sorted((run_dir / STAGES_DIR).glob("*"))]:  # a staged run: one report per stage
        if (folder / STRUCTURE_FILE).is_file():
            write_structure_report(folder)


class RunJob:
    """``RunJob(cfg.to_dict())()`` runs the experiment and returns its result row.

    The config is a plain dict (what pickles anywhere, whatever this process's classes); the job
    parses and validates it again where it runs. ``run_id``, when given (the dispatcher gives the
    id it submitted under), must be the rebuilt config's: a local model file replaced in between
    would send the run to another directory than the manifest says. A run whose ``result.json``
    says completed is not run again (its row is returned) unless ``force``; an unfinished one
    resumes from its newest checkpoint; ``force=True`` starts from step 0, once: the same job restarted
    by its scheduler (:func:`experiments.backends.restart_count` > 0: SLURM's ``SLURM_RESTART_COUNT``)
    resumes. A job that SLURM preempts or times out gets submitit's ``SIGUSR2``: every rank finishes its
    step, the checkpoint of that step and the ``interrupted`` row are written (:mod:`compress.stopping`), and
    only then is the job requeued, by submitit's own handler (:func:`requeue_after_stop`; it calls
    :meth:`checkpoint`), and resumes."""

    def __init__(self, config: Mapping[str, Any], force: bool = False, run_id: str | None = None) -> None:
        if not isinstance(config, Mapping):
            raise TypeError(f"RunJob takes a plain config dict (cfg.to_dict()), got {type(config).__name__}")
        self.config = dict(config)
        self.force = force
        self.run_id = run_id

    def run_config(self) -> RunConfig:
        """The config, parsed and validated in this process."""
        cfg = config_from_dict(self.config)
        if self.run_id is not None and run_id_of(cfg) != self.run_id:
            raise RunError(
                f"run {cfg.name}: the config was submitted as run {self.run_id} but is run {run_id_of(cfg)} here "
                "(a local model file changed since submission?): submit it again"
            )
        return cfg

    def __call__(self) -> dict[str, Any]:
        from compress import distributed
        from compress.run import run_experiment

        cfg = self.run_config()
        run_dir = run_dir_for(cfg)
        # force is one-shot: a job SLURM restarts itself (node failure, PreemptMode=REQUEUE) reloads the
        # pickle submitted with force and must resume, not throw its progress away
        force = self.force and restart_count() == 0
        done = completed_row(cfg)
        if done is not None and not force:
            return done  # a requeued or resubmitted job of a finished run: nothing to do
        export_task_environment()
        try:
            row = run_experiment(cfg, force=force)
        except StoppedAtStep as stop:  # the checkpoint and the interrupted row are written: now requeue
            if requeue_after_stop(stop):
                return own_result(cfg) or {"run_id": run_id_of(cfg), "name": cfg.name, "status": "interrupted"}
            raise
        # the process group is gone by now: the rank the job was launched as decides who writes
        launch = distributed.environment()
        if launch.rank == 0:
            write_reports(run_dir)
        elif row.get("status") != STATUS_COMPLETED:  # exit non-zero: srun ends the other tasks of the step
            raise RunError(f"run {cfg.name}, rank {launch.rank} of {launch.world_size}: {row.get('error')}")
        return row

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit calls this on preemption or timeout: requeue the same run, which resumes from its
        newest checkpoint (never with ``force``: that would throw the progress away)."""
        import submitit

        return submitit.helpers.DelayedSubmission(RunJob(self.config, run_id=self.run_id))


def requeue_after_stop(stop: StoppedAtStep) -> bool:
    """After a stop on submitit's preemption signal (``SIGUSR2``) inside a submitit job, do what submitit's own
    handler would have done when the signal came, now that the checkpoint is written: on the task of global rank
    0 the handler calls the job's ``checkpoint()`` (:meth:`RunJob.checkpoint`, :meth:`RunQueue.checkpoint`),
    dumps the resubmission, requeues the job (``scontrol requeue`` under SLURM) and exits (``SystemExit``, as
    submitit does). The other tasks return True and end quietly (exit 0: a failing task could make srun end
    the step before rank 0 requeued it; the requeue ends them anyway). False where there is nothing to do:
    outside a submitit job, or on ``SIGTERM`` (a cancelled job stays cancelled; a preempted one is requeued
    by SLURM itself)."""
    import submitit
    from submitit.core.job_environment import SignalHandler

    try:
        env = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job: the caller (the command line) reports the stop
        return False
    preempt = env._usr_sig()
    if stop.signum != preempt:
        return False
    handler = signal.getsignal(preempt)  # submitit's, restored when the run ended
    if not isinstance(getattr(handler, "__self__", None), SignalHandler):
        return False
    handler(preempt, None)  # rank 0: requeues and exits; the others: returns
    return True


class RunQueue:
    """Several runs one after the other in one job (the ``local`` backend's way of running at most
    ``dispatch.max_parallel`` at once). A run that fails does not stop the queue: its row says failed;
    one whose directory another live process holds is ``running elsewhere`` (not failed). On preemption or timeout the
    rest of the queue is requeued: the current run resumes, the ones not started yet keep their
    ``force``. Returns the rows in order."""

    def __init__(self, jobs: list[RunJob]) -> None:
        self.jobs = list(jobs)
        self.current = 0

    def __call__(self) -> list[dict[str, Any]]:
        rows = []
        for index, job in enumerate(self.jobs):
            self.current = index
            try:
                rows.append(job())
            except RunDirBusy as error:  # another process runs it (a second sweep): not a failure of this queue
                rows.append({"run_id": job.run_id, "name": job.config.get("name"), "status": RUNNING_ELSEWHERE,
                             "error": str(error)})
            except Exception as error:  # noqa: BLE001 - one run's problem; the queue goes on
                rows.append({"run_id": job.run_id, "name": job.config.get("name"), "status": STATUS_FAILED,
                             "error": f"{type(error).__name__}: {error}"})
        return rows

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        current, *rest = self.jobs[self.current:]
        return submitit.helpers.DelayedSubmission(RunQueue([current.checkpoint().function, *rest]))
