"""Run configs in-process, as local processes or on a SLURM cluster, through submitit."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from compress.config import RunConfig
from compress.results import STATUS_COMPLETED, read_result
from compress.run import run_dir_for
from experiments.job import RunJob

BACKENDS = ("inprocess", "local", "slurm")


class DispatchError(RuntimeError):
    """A run cannot be dispatched as asked (no cluster here, say)."""


def make_executor(cfg: RunConfig, backend: str, folder: Path):
    """A submitit executor for ``local`` (processes on this machine) or ``slurm``."""
    import submitit

    d = cfg.dispatch
    if backend == "local":
        executor = submitit.LocalExecutor(folder=str(folder))
        executor.update_parameters(timeout_min=d.timeout_min, gpus_per_node=d.gpus_per_node if _has_cuda() else 0)
        return executor
    if shutil.which("sbatch") is None:
        raise DispatchError(
            "dispatch.backend is slurm, but there is no SLURM here (sbatch not found on PATH): "
            "use --backend inprocess or --backend local on this machine"
        )
    executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
    params: dict[str, Any] = {
        "timeout_min": d.timeout_min,
        "nodes": d.nodes,
        "gpus_per_node": d.gpus_per_node,
        "tasks_per_node": max(d.gpus_per_node, 1),
        "name": cfg.name,
    }
    if d.partition:
        params["slurm_partition"] = d.partition
    if d.slurm_options:
        params["slurm_additional_parameters"] = dict(d.slurm_options)
    executor.update_parameters(**params)
    return executor


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def dispatch(cfgs: list[RunConfig], backend: str | None = None, force: bool = False) -> list[dict[str, Any]]:
    """Run every config (skipping those whose ``result.json`` says completed; an unfinished run
    resumes from its checkpoint) and return their result rows, in order. ``force`` reruns every
    config from step 0. ``local``/``slurm`` wait for the jobs."""
    rows: list[dict[str, Any] | None] = []
    jobs = []
    for cfg in cfgs:
        chosen = backend or cfg.dispatch.backend
        if chosen not in BACKENDS:
            raise ValueError(f"unknown backend {chosen!r}; one of {', '.join(BACKENDS)}")
        run_dir = run_dir_for(cfg)
        done = read_result(run_dir)
        if done and done.get("status") == STATUS_COMPLETED and done.get("run_id") == cfg.run_id() and not force:
            print(f"[skip] {cfg.name} ({cfg.run_id()}): completed result in {run_dir}")
            rows.append({**done, "status": "skipped"})
            continue
        if chosen == "inprocess":
            rows.append(RunJob(cfg, force=force)())
            continue
        executor = make_executor(cfg, chosen, run_dir / "submitit")
        job = executor.submit(RunJob(cfg, force=force))
        print(f"[submitted] {cfg.name} ({cfg.run_id()}) as {chosen} job {job.job_id}; logs in {run_dir / 'submitit'}")
        jobs.append((len(rows), job, run_dir))
        rows.append(None)
    for index, job, run_dir in jobs:
        try:
            rows[index] = job.result()
        except Exception as e:  # the job's own result.json holds the failure
            rows[index] = read_result(run_dir) or {"status": "failed", "error": str(e)}
    return [r for r in rows if r is not None]
