"""The submitit job: a picklable callable that runs one config (and can be requeued)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from compress.config import RunConfig
from compress.run import run_dir_for


def _setup_distributed_from_submitit() -> None:
    """Under submitit with several tasks, export the torch.distributed variables and init."""
    try:
        import submitit

        env = submitit.JobEnvironment()
    except RuntimeError:
        return
    if env.num_tasks <= 1:
        return
    import torch
    import torch.distributed as dist

    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)


def write_reports(run_dir: Path) -> None:
    """Human-readable companions of a run: the structure table and heat-map (kept heads and
    MLP neurons per layer) next to ``result.json``."""
    from analysis.structure_report import write_structure_report
    from compress.models.nonuniform import STRUCTURE_FILE

    if (run_dir / STRUCTURE_FILE).is_file():
        write_structure_report(run_dir)


class RunJob:
    """``RunJob(cfg)()`` runs the experiment and returns its result row.

    submitit pickles this object; ``checkpoint`` makes a preempted SLURM job requeue itself
    (the run resumes in the same run directory)."""

    def __init__(self, cfg: RunConfig, force: bool = False) -> None:
        self.cfg = cfg
        self.force = force

    def __call__(self) -> dict[str, Any]:
        from compress.run import run_experiment

        _setup_distributed_from_submitit()
        row = run_experiment(self.cfg, force=self.force)
        write_reports(run_dir_for(self.cfg))
        return row

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit

        return submitit.helpers.DelayedSubmission(RunJob(self.cfg, force=False))
