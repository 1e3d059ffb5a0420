"""``inline``: each run in this process, one after the other, before :meth:`submit` returns (also one process of a
``torchrun`` of several: the run is then data-parallel over them)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from compress.config import RunConfig
from compress.recipe import run_id_of
from experiments.backends import register_backend
from experiments.backends.base import Backend, DispatchError, Notify, Submission


@register_backend
class InlineBackend(Backend):
    """The job in this process: no submitit, no job of its own."""

    name = "inline"
    waits = True
    under_torchrun = True

    def refuse(self, groups: Sequence[Sequence[RunConfig]]) -> None:
        """A run of several processes (``nodes`` x ``tasks_per_node``) unless this is one of as many (torchrun)."""
        for group in groups:
            d = group[0].dispatch
            tasks = d.nodes * d.tasks()
            if tasks > 1 and _world_size() != tasks:
                raise DispatchError(
                    f"dispatch asks for {d.nodes} node(s) x {d.tasks()} tasks ({d.gpus_per_node} GPUs per node), "
                    f"but the {self.name} backend runs in this one process: use --backend local or slurm (one task "
                    f"per GPU), or start {tasks} processes with torchrun"
                )

    def submit(self, groups: Sequence[Sequence[RunConfig]], folder: Path, force: bool,
               notify: Notify) -> list[Submission]:
        return [self.run_here(cfg, folder, force, notify) for group in groups for cfg in group]

    def run_here(self, cfg: RunConfig, folder: Path, force: bool, notify: Notify) -> Submission:
        """Run ``cfg``'s job now and return its row."""
        from experiments.job import RunJob

        job = RunJob(cfg.to_dict(), force=force, run_id=run_id_of(cfg))
        notify(cfg, self.name)
        return Submission(cfg, self.name, self.name, row=job())



def _world_size() -> int:
    """The processes of this run (``torchrun``'s ``WORLD_SIZE``; 1 without it)."""
    from compress.distributed import environment

    return environment().world_size
