"""The submitit job: a picklable callable that runs one config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.config import RunConfig
from compress.run import RunError, run_dir_for


def refuse_multiple_tasks() -> None:
    """Under submitit with several tasks (one per GPU), stop: data-parallel training is not
    built yet, and each task would train its own replica."""
    try:
        import submitit

        env = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job
        return
    if env.num_tasks > 1:
        raise RunError(
            f"the job has {env.num_tasks} tasks, but multi-process (DistributedDataParallel) training is not "
            "built yet: use dispatch.nodes: 1 and dispatch.gpus_per_node: 1"
        )


def write_reports(run_dir: Path) -> None:
    """Human-readable companions of a run: the structure table and heat-map (kept heads and
    MLP neurons per layer) next to ``result.json``."""
    from analysis.structure_report import write_structure_report
    from compress.models.nonuniform import STRUCTURE_FILE
    from compress.rundir import STAGES_DIR

    for folder in [run_dir, *sorted((run_dir / STAGES_DIR).glob("*"))]:  # a staged run: one report per stage
        if (folder / STRUCTURE_FILE).is_file():
            write_structure_report(folder)


class RunJob:
    """``RunJob(cfg)()`` runs the experiment and returns its result row.

    A job started again in the same run directory resumes from the run's newest checkpoint
    (finished stages are kept); ``force=True`` starts the run from step 0 instead. A job that
    SLURM preempts or times out is requeued (:meth:`checkpoint`) and resumes."""

    def __init__(self, cfg: RunConfig, force: bool = False) -> None:
        self.cfg = cfg
        self.force = force

    def __call__(self) -> dict[str, Any]:
        from compress.run import run_experiment

        refuse_multiple_tasks()
        row = run_experiment(self.cfg, force=self.force)
        write_reports(run_dir_for(self.cfg))
        return row

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit calls this on preemption or timeout: requeue the same run, which resumes from its
        newest checkpoint (never with ``force``: that would throw the progress away)."""
        import submitit

        return submitit.helpers.DelayedSubmission(RunJob(self.cfg))
