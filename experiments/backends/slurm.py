"""``slurm``: job arrays through submitit's ``SlurmExecutor``; :meth:`submit` returns at once, and the run's row
arrives later in its run directory. The sbatch resources are this backend's settings (``dispatch.partition``,
``account``, ``cpus_per_task``, ``mem_gb``, ``timeout_min``, ``array_parallelism``, ``max_array_size``,
``slurm_options``), checked where the config is validated; a job SLURM preempts or times out is requeued (USR2
arrives ``signal_delay_s`` before the limit, :mod:`compress.stopping`) and resumes from its checkpoint."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.config import ConfigError, RunConfig
from compress.recipe import run_id_of
from experiments.backends import register_backend
from experiments.backends.base import (
    Backend,
    DispatchError,
    JobSettings,
    Notify,
    Submission,
    at_least,
    submit_groups,
)

#: how much earlier than ``--signal=USR2@N`` asks SLURM may deliver the signal (its event timer's resolution)
SIGNAL_EARLY_S = 60

#: sbatch flags the backend writes itself, and the key that sets each
MANAGED_SBATCH_FLAGS = {
    "partition": "dispatch.partition", "account": "dispatch.account", "time": "dispatch.timeout_min",
    "nodes": "dispatch.nodes", "ntasks-per-node": "dispatch.tasks_per_node",
    "gpus-per-node": "dispatch.gpus_per_node", "cpus-per-task": "dispatch.cpus_per_task", "mem": "dispatch.mem_gb",
    "array": "dispatch.max_array_size and array_parallelism", "signal": "dispatch.signal_delay_s",
    "job-name": "the run's or the sweep's name", "output": "the submitit log folder",
    "error": "the submitit log folder", "requeue": "always on: a preempted or timed-out job is requeued",
}


@dataclass
class SlurmSettings(JobSettings):
    """The sbatch resources; a sweep's runs as job arrays of at most ``max_array_size`` tasks (the cluster's
    MaxArraySize) with ``array_parallelism`` running at once. ``slurm_options``: further ``#SBATCH`` flags,
    e.g. ``{constraint: a100, qos: high}``."""

    partition: str | None = None
    account: str | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    array_parallelism: int = 256
    max_array_size: int = 1000
    slurm_options: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        super().check()
        at_least(self, array_parallelism=1, max_array_size=1, cpus_per_task=1)
        if self.mem_gb is not None and not self.mem_gb > 0:
            raise ConfigError(f"dispatch.mem_gb: must be a number > 0 (or null: the partition's default), "
                              f"got {self.mem_gb}")
        for key, value in self.slurm_options.items():
            flag = str(key).replace("_", "-")
            if flag in MANAGED_SBATCH_FLAGS:
                raise ConfigError(f"dispatch.slurm_options.{key}: set by the dispatcher "
                                  f"({MANAGED_SBATCH_FLAGS[flag]}); not an option")
            if value is not None and not isinstance(value, str | int | float | bool):
                raise ConfigError(f"dispatch.slurm_options.{key}: expected a string, number or true, got {value!r}")


#: job states ``squeue`` may still list for a job that is over
FINAL_JOB_STATES = frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
                              "OUT_OF_MEMORY", "PREEMPTED", "REVOKED", "SPECIAL_EXIT", "TIMEOUT"})
#: a SLURM job id as the manifest holds it: ``JOB`` or ``JOB_TASK`` (an array task)
_JOB_ID = re.compile(r"\d+(_\d+)?")


def scheduler_jobs(job_ids: Iterable[str]) -> dict[str, str] | None:
    """The jobs of ``job_ids`` (``JOB`` or ``JOB_TASK``) that SLURM still has in its queue, with their state
    (``PENDING``, ``RUNNING``, ...), from ONE ``squeue`` call for all of them (``-r``: one line per array
    task); ``None`` where SLURM cannot be asked (no ``squeue`` on PATH, or it fails)."""
    ids = {str(j) for j in job_ids if j is not None and _JOB_ID.fullmatch(str(j))}
    if not ids:
        return {}
    if shutil.which("squeue") is None:
        return None
    jobs = ",".join(sorted({j.split("_", 1)[0] for j in ids}, key=int))
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", jobs], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:  # every job id unknown (purged since): none is queued; else SLURM did not answer
        return {} if "Invalid job id" in out.stderr else None
    alive = {}
    for line in out.stdout.splitlines():
        job_id, _, job_state = line.strip().partition("|")
        job_state = job_state.split()[0] if job_state.split() else ""
        if job_id in ids and job_state and job_state not in FINAL_JOB_STATES:
            alive[job_id] = job_state
    return alive


@register_backend
class SlurmBackend(Backend):
    """Job arrays on a SLURM cluster (one array task per run, ``nodes`` x ``tasks_per_node`` tasks each)."""

    name = "slurm"
    returns_result = False  # the row arrives in the run directory later
    queue_visible = True
    scheduler = "SLURM"
    queue_query_hint = "squeue missing or failing"
    runs_here = False  # its nodes are not this machine: the device is checked where the job runs
    Settings = SlurmSettings

    def queued_jobs(self, job_ids: Sequence[str]) -> dict[str, str] | None:
        return scheduler_jobs(job_ids)

    def refuse(self, groups: Sequence[Sequence[RunConfig]]) -> None:
        """No SLURM here, a warning signal that leaves the job less than a minute, or a job no node of its
        partition can hold (:func:`check_partition`)."""
        if shutil.which("sbatch") is None or shutil.which("srun") is None:
            raise DispatchError("dispatch.backend is slurm, but there is no SLURM here (sbatch not found on PATH): "
                                "use --backend inline or --backend local on this machine")
        for group in groups:
            s = self.settings(group[0].dispatch)
            if 60 * s.timeout_min - s.signal_delay_s - SIGNAL_EARLY_S < 60:
                raise DispatchError(
                    f"dispatch.signal_delay_s {s.signal_delay_s} s and dispatch.timeout_min {s.timeout_min}: SLURM "
                    f"may send the warning signal up to {SIGNAL_EARLY_S} s before signal_delay_s, which leaves the job "
                    f"less than a minute before it (killed before it can checkpoint): need signal_delay_s <= "
                    f"{max(60 * s.timeout_min - SIGNAL_EARLY_S - 60, 0)} or a longer timeout_min"
                )
        for group in groups:
            check_partition(group[0].dispatch, self.settings(group[0].dispatch))

    def submit(self, groups: Sequence[Sequence[RunConfig]], folder: Path, force: bool,
               notify: Notify) -> list[Submission]:
        return submit_groups(self, groups, notify, lambda index, group: self.submit_group(group, folder, force))

    def submit_group(self, group: Sequence[RunConfig], folder: Path, force: bool) -> list[Submission]:
        """Job arrays of at most ``max_array_size`` runs (one array task per run)."""
        from experiments.job import RunJob

        executor = self.executor(group[0], folder)
        size = self.settings(group[0].dispatch).max_array_size
        out = []
        for start in range(0, len(group), size):
            chunk = group[start:start + size]
            with executor.batch():
                jobs = [executor.submit(RunJob(cfg.to_dict(), force=force, run_id=run_id_of(cfg))) for cfg in chunk]
            out += [Submission(cfg, self.name, str(job.job_id), job=job) for cfg, job in zip(chunk, jobs, strict=True)]
        return out

    def submit_tasks(self, name: str, calls: Sequence[Any], cfg: RunConfig, folder: Path) -> list[str]:
        """Job arrays (of at most ``max_array_size``) of one task each, one GPU each when the config asks for
        GPUs, with the config's partition, account, time and memory; returns each call's job id."""
        executor = self.executor(cfg, folder)
        params: dict[str, Any] = {"job_name": name, "nodes": 1, "ntasks_per_node": 1}
        if cfg.dispatch.gpus_per_node:
            params["gpus_per_node"] = 1
        executor.update_parameters(**params)
        size = self.settings(cfg.dispatch).max_array_size
        ids: list[str] = []
        for start in range(0, len(calls), size):
            with executor.batch():
                jobs = [executor.submit(call) for call in calls[start:start + size]]
            ids += [str(job.job_id) for job in jobs]
        return ids

    def executor(self, cfg: RunConfig, folder: Path) -> Any:
        """submitit's SLURM executor with the run's settings: ``tasks_per_node`` tasks per node (one per GPU),
        and ``--gpus-per-node`` only when the run asks for GPUs (``gpus_per_node`` > 0)."""
        import submitit

        d, s = cfg.dispatch, self.settings(cfg.dispatch)
        executor = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=s.max_num_timeout)
        params: dict[str, Any] = {"job_name": cfg.name, "time": s.timeout_min, "nodes": d.nodes,
                                  "ntasks_per_node": d.tasks(), "signal_delay_s": s.signal_delay_s,
                                  "array_parallelism": s.array_parallelism}
        if d.gpus_per_node:
            params["gpus_per_node"] = d.gpus_per_node
        optional = {"partition": s.partition, "account": s.account, "cpus_per_task": s.cpus_per_task,
                    "mem": _mem(s.mem_gb) if s.mem_gb is not None else None}
        params.update({k: v for k, v in optional.items() if v is not None})
        # requeueable whatever the cluster's default (JobRequeue): submitit requeues a preempted or timed-out job
        # with `scontrol requeue` after its checkpoint() (USR2 arrives signal_delay_s before the limit)
        params["additional_parameters"] = {"requeue": True,
                                           **{str(k).replace("_", "-"): v for k, v in s.slurm_options.items()}}
        if d.nodes * d.tasks() > 1:
            # a task that fails ends the step: its peers would otherwise wait in a collective (NCCL: for hours)
            params["srun_args"] = ["--kill-on-bad-exit=1"]
        executor.update_parameters(**params)
        return executor

    def failure_hint(self, group: Sequence[RunConfig]) -> str:
        gpus = group[0].dispatch.gpus_per_node
        if not gpus:
            return ""
        return (f" (the job asks for {gpus} GPU(s) per node, dispatch.gpus_per_node: on a partition without GPUs "
                "set gpus_per_node: 0 and tasks_per_node for CPU processes)")

    @staticmethod
    def restart_count() -> int:
        """How often SLURM has restarted this job (``SLURM_RESTART_COUNT``, set on a requeued job); 0 outside SLURM."""
        try:
            return int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        except ValueError:
            return 0


def _mem(gb: float) -> str:
    return f"{int(gb)}GB" if float(gb).is_integer() else f"{int(gb * 1024)}MB"


# -- the partition's nodes (sinfo) -------------------------------------------------------------------
@dataclass(frozen=True)
class Node:
    """One node of a partition as ``sinfo`` lists it: CPUs, memory (MB) and GPUs (its ``gpu`` GRES)."""

    name: str
    cpus: int
    mem_mb: int
    gpus: int


def partition_nodes(partition: str | None) -> list[Node] | None:
    """The nodes of ``partition`` (a comma list; ``None``: the default partition, starred by ``sinfo``),
    from one ``sinfo -N`` call; ``None`` where SLURM cannot be asked (no ``sinfo``, or it fails)."""
    if shutil.which("sinfo") is None:
        return None
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N|%c|%m|%G|%P"], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    wanted = None if partition is None else set(partition.split(","))
    nodes: dict[str, Node] = {}
    for line in out.stdout.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 5:
            continue
        name, cpus, mem, gres, part = fields
        if (part.endswith("*") if wanted is None else part.rstrip("*") in wanted):
            nodes[name] = Node(name, _leading_int(cpus), _leading_int(mem), gres_gpus(gres))
    return list(nodes.values())


def _leading_int(text: str) -> int:
    match = re.match(r"\d+", text.strip())
    return int(match.group()) if match else 0


def gres_gpus(gres: str) -> int:
    """The GPUs of a node's GRES as ``sinfo %G`` prints it: ``gpu:8``, ``gpu:a100:4(S:0-1),gpu:v100:2`` (6)."""
    return sum(int(n) for n in re.findall(r"(?:^|,)gpu(?::[^:,(]+)?:(\d+)", gres.strip()))


def check_partition(d: Any, s: SlurmSettings) -> None:
    """Refuse a job that no node of its partition can hold (more GPUs, CPUs or memory per node than any
    node has, or more nodes than fit): SLURM would keep it pending forever without a word. Where SLURM
    cannot be asked (no ``sinfo``), or the partition lists no node (hidden from this user), nothing is checked."""
    nodes = partition_nodes(s.partition)
    if not nodes:
        return
    cpus = d.tasks() * (s.cpus_per_task or 1)
    mem_mb = int(s.mem_gb * 1024) if s.mem_gb is not None else 0
    fits = [n for n in nodes if n.gpus >= d.gpus_per_node and n.cpus >= cpus and n.mem_mb >= mem_mb]
    if len(fits) >= d.nodes:
        return
    where = f"partition {s.partition}" if s.partition else "the default partition"
    asks = [f"{d.gpus_per_node} GPUs (gpus_per_node)", f"{cpus} CPUs (tasks_per_node x cpus_per_task)"]
    if mem_mb:
        asks.append(f"{mem_mb} MB (mem_gb)")
    raise DispatchError(
        f"{where} has no {d.nodes} node(s) with {', '.join(asks)} each: its {len(nodes)} node(s) have at most "
        f"{max(n.gpus for n in nodes)} GPUs, {max(n.cpus for n in nodes)} CPUs, {max(n.mem_mb for n in nodes)} MB "
        f"({len(fits)} fit); the job would stay pending forever: lower the dispatch settings or choose another "
        "dispatch.partition"
    )
