"""``debug``: each run through submitit's ``DebugExecutor`` (its job environment and log files), in this process,
one after the other, before :meth:`submit` returns."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compress.config import RunConfig
from compress.recipe import run_id_of
from experiments.backends import register_backend
from experiments.backends.base import Notify, Submission
from experiments.backends.inline import InlineBackend


class _Captured:
    """Calls the job and returns its exception instead of raising it: submitit's debug executor
    opens pdb on an exception, which must never happen in a sweep (or a test)."""

    def __init__(self, job: Any) -> None:
        self.job = job

    def __call__(self) -> Any:
        try:
            return self.job()
        except Exception as error:  # noqa: BLE001 - re-raised by the caller, outside submitit
            return error


@register_backend
class DebugBackend(InlineBackend):
    """submitit's in-process debug executor (what a job sees, without a cluster)."""

    name = "debug"
    under_torchrun = False

    def run_here(self, cfg: RunConfig, folder: Path, force: bool, notify: Notify) -> Submission:
        import submitit

        from experiments.job import RunJob

        executor = submitit.DebugExecutor(folder=str(folder))
        debug_job = executor.submit(_Captured(RunJob(cfg.to_dict(), force=force, run_id=run_id_of(cfg))))
        notify(cfg, str(debug_job.job_id))
        result = debug_job.result()
        if isinstance(result, Exception):
            raise result
        return Submission(cfg, self.name, str(debug_job.job_id), row=result, job=debug_job)
