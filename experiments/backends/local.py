"""``local``: processes on this machine through submitit's ``LocalExecutor``, at most ``dispatch.max_parallel`` jobs
at once per group of equal settings, each job with its own GPUs; :meth:`submit` returns at once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.config import ConfigError, RunConfig
from compress.recipe import run_id_of
from experiments.backends import register_backend
from experiments.backends.base import Backend, DispatchError, JobSettings, Notify, Submission, at_least, submit_groups


@dataclass
class LocalSettings(JobSettings):
    """``max_parallel`` runs at once (jobs), each with ``timeout_min``; a job runs its share of the runs one after
    the other."""

    max_parallel: int = 1

    def check(self) -> None:
        super().check()
        at_least(self, max_parallel=1)


@register_backend
class LocalBackend(Backend):
    """Jobs on this machine (one task per GPU; on a machine without GPUs, that many CPU processes)."""

    name = "local"
    Settings = LocalSettings

    def refuse(self, groups: Sequence[Sequence[RunConfig]]) -> None:
        for group in groups:
            if group[0].dispatch.nodes != 1:
                raise DispatchError(f"dispatch.nodes is {group[0].dispatch.nodes}: the local backend runs on this "
                                    "machine only (nodes: 1)")

    def check_device(self, cfg: RunConfig) -> None:
        """A job with ``dispatch.gpus_per_node: 0`` sees no GPU at all (``CUDA_VISIBLE_DEVICES`` empty)."""
        t = cfg.train
        if cfg.dispatch.gpus_per_node == 0 and str(t.device).startswith("cuda"):
            raise ConfigError(f"train.device: {t.device!r} but dispatch.gpus_per_node is 0: a local job then sees no "
                              "GPU (CUDA_VISIBLE_DEVICES is empty); set dispatch.gpus_per_node, or train.device: cpu "
                              "or auto")
        super().check_device(cfg)

    def submit(self, groups: Sequence[Sequence[RunConfig]], folder: Path, force: bool,
               notify: Notify) -> list[Submission]:
        firsts = self.first_gpus(groups)  # refused before any job starts
        return submit_groups(self, groups, notify,
                             lambda index, group: self.submit_group(group, folder, force, firsts[index]))

    def first_gpus(self, groups: Sequence[Sequence[RunConfig]]) -> list[int]:
        """The first GPU of each group's jobs: every job of every group at once gets its own ``gpus_per_node``
        GPUs (``min(max_parallel, runs)`` jobs per group); fewer GPUs than that is refused rather than letting
        jobs share them. Without GPUs the tasks are CPU processes (all zeros)."""
        devices = cuda_devices()
        if not devices:
            return [0] * len(groups)
        firsts, needs, need = [], [], 0
        for group in groups:
            d = group[0].dispatch
            slots, gpus = min(self.settings(d).max_parallel, len(group)), d.gpus_per_node
            firsts.append(need)
            needs.append(f"{slots} parallel job(s) x {gpus} GPUs")
            need += slots * gpus
        if need > devices:
            raise DispatchError(
                f"the local jobs need {need} GPUs ({' + '.join(needs)}) but this machine has {devices}: lower "
                "dispatch.max_parallel or dispatch.gpus_per_node (jobs never share GPUs)"
            )
        return firsts

    def submit_group(self, group: Sequence[RunConfig], folder: Path, force: bool, first_gpu: int) -> list[Submission]:
        """At most ``max_parallel`` jobs, each running its share of the runs one after the other (round robin),
        with ``tasks_per_node`` tasks; the jobs get disjoint GPUs from ``first_gpu`` on."""
        import submitit

        from experiments.job import RunJob, RunQueue

        d, s = group[0].dispatch, self.settings(group[0].dispatch)
        slots = min(s.max_parallel, len(group))
        gpus = d.gpus_per_node if cuda_devices() else 0
        out = []
        for slot in range(slots):
            cfgs = group[slot::slots]
            executor = submitit.LocalExecutor(folder=str(folder), max_num_timeout=s.max_num_timeout)
            # the time limit is per run: a job running a queue of k runs gets k times timeout_min
            params: dict[str, Any] = {"timeout_min": s.timeout_min * len(cfgs), "gpus_per_node": gpus,
                                      "tasks_per_node": d.tasks(), "signal_delay_s": s.signal_delay_s}
            if gpus:
                params["visible_gpus"] = list(range(first_gpu + slot * gpus, first_gpu + (slot + 1) * gpus))
            executor.update_parameters(**params)
            jobs = [RunJob(cfg.to_dict(), force=force, run_id=run_id_of(cfg)) for cfg in cfgs]
            job = executor.submit(jobs[0] if len(jobs) == 1 else RunQueue(jobs))
            out += [Submission(cfg, self.name, str(job.job_id), job=job) for cfg in cfgs]
        return out


    def submit_tasks(self, name: str, calls: Sequence[Any], cfg: RunConfig, folder: Path) -> list[str]:
        """At most ``max_parallel`` LocalExecutor jobs of one task, each running its share of ``calls`` (round
        robin) with one GPU of its own when ``dispatch.gpus_per_node`` asks for GPUs; returns each call's job id."""
        import submitit

        from experiments.backends.base import CallQueue

        s = self.settings(cfg.dispatch)
        slots = min(s.max_parallel, len(calls))
        gpus = 1 if cfg.dispatch.gpus_per_node and cuda_devices() else 0
        if gpus and slots > cuda_devices():
            raise DispatchError(f"{slots} parallel local jobs of one GPU each but this machine has {cuda_devices()} "
                                "GPUs: lower dispatch.max_parallel (jobs never share GPUs)")
        ids: list[str] = [""] * len(calls)
        for slot in range(slots):
            mine = list(range(slot, len(calls), slots))
            executor = submitit.LocalExecutor(folder=str(folder), max_num_timeout=s.max_num_timeout)
            params: dict[str, Any] = {"timeout_min": s.timeout_min * len(mine), "gpus_per_node": gpus,
                                      "tasks_per_node": 1, "signal_delay_s": s.signal_delay_s}
            if gpus:
                params["visible_gpus"] = [slot]
            executor.update_parameters(**params)
            job = executor.submit(calls[mine[0]] if len(mine) == 1 else CallQueue([calls[i] for i in mine]))
            for i in mine:
                ids[i] = str(job.job_id)
        return ids


def cuda_devices() -> int:
    """The GPUs this machine has (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
