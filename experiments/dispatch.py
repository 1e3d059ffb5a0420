"""Run configs through submitit: ``inline`` (this process), ``debug`` (submitit's in-process
debug executor), ``local`` (processes on this machine, at most ``dispatch.max_parallel`` at once
per group of equal ``dispatch`` settings, on disjoint GPUs)
or ``slurm`` (job arrays).

:func:`submit` never waits for ``local`` and ``slurm`` jobs; ``inline`` and ``debug`` run their
configs one after the other before it returns. The job is :class:`experiments.job.RunJob`, a
picklable callable of the plain config dict that resumes from its run directory and requeues
itself on preemption or timeout.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.config import ConfigError, RunConfig
from compress.config.schema import DISPATCH_BACKENDS
from compress.distributed import environment
from compress.results import STATUS_FAILED, read_result
from compress.rundir import check_writable, run_dir_for
from experiments.job import RunJob, RunQueue, completed_row

BACKENDS = DISPATCH_BACKENDS
#: the status of a row for a run handed to SLURM (its result arrives later)
STATUS_SUBMITTED = "submitted"
#: how much earlier than ``--signal=USR2@N`` asks SLURM may deliver the signal (its event timer's resolution)
SIGNAL_EARLY_S = 60


class DispatchError(RuntimeError):
    """A run cannot be dispatched as asked (no cluster here, say)."""


@dataclass
class Submission:
    """A run handed to a backend: its job id, and its row once known (``inline``/``debug``)."""

    cfg: RunConfig
    backend: str
    job_id: str
    row: dict[str, Any] | None = None
    job: Any = None


def submit(
    cfgs: Sequence[RunConfig],
    backend: str,
    folder: Path,
    force: bool = False,
    on_submit: Callable[[RunConfig, str], None] | None = None,
) -> list[Submission]:
    """Hand every config to ``backend`` (submitit's logs and pickles under ``folder``); configs whose
    ``dispatch`` settings differ go into separate executors (separate arrays). ``on_submit(cfg,
    job_id)`` is called as soon as a run has its job id, before an ``inline``/``debug`` run starts."""
    if backend not in BACKENDS:
        hint = " (renamed: use 'inline')" if backend == "inprocess" else ""
        raise DispatchError(f"unknown backend {backend!r}{hint}; one of {', '.join(BACKENDS)}")
    notify = on_submit or (lambda cfg, job_id: None)
    groups = _groups(cfgs)
    for group in groups:  # what cannot be submitted is refused before anything is
        _check_resources(group[0], backend)
    check_before_run(cfgs, backend)  # before submitit writes its folder in a run directory
    if backend == "slurm":
        for group in groups:
            check_partition(group[0])
    first_gpus = _local_gpus(groups) if backend == "local" else []
    if backend in ("inline", "debug"):
        return [_run_here(cfg, backend, folder, force, notify) for cfg in cfgs]
    order = {id(cfg): i for i, cfg in enumerate(cfgs)}
    out: list[Submission] = []
    for index, group in enumerate(groups):
        try:
            done = (_submit_local(group, folder, force, first_gpus[index]) if backend == "local"
                    else _submit_slurm(group, folder, force))
        except (OSError, RuntimeError) as error:  # sbatch refused (submitit's FailedJobError), a process did not start
            message = " ".join(str(error).split())
            gpus = group[0].dispatch.gpus_per_node
            if backend == "slurm" and gpus:
                message += (f" (the job asks for {gpus} GPU(s) per node, dispatch.gpus_per_node: on a partition "
                            "without GPUs set gpus_per_node: 0 and tasks_per_node for CPU processes)")
            raise DispatchError(f"{backend} submission failed: {message}") from None
        done.sort(key=lambda s: order[id(s.cfg)])
        for submission in done:  # recorded group by group: what was submitted is in the manifest if a later one fails
            notify(submission.cfg, submission.job_id)
        out += done
    out.sort(key=lambda s: order[id(s.cfg)])
    return out


def check_before_run(cfgs: Sequence[RunConfig], backend: str | Sequence[str]) -> None:
    """What a run would refuse a second after it starts, refused before any is submitted, in one line: a run
    directory that cannot be made (``output.dir`` a file, a read-only folder), a student its inheritance cannot
    fill from its source (:func:`compress.plan.check_inheritances`) and, for the backends that run on this machine
    (not ``slurm``: its nodes are not this machine), a ``train.device``/``train.precision`` it does not have
    (:func:`compress.run.run_device`); a ``local`` job with ``dispatch.gpus_per_node: 0`` sees no GPU at all
    (``CUDA_VISIBLE_DEVICES`` empty), so a ``cuda`` device is refused there too. ``backend``: one for all, or one
    per config. Each check runs once per distinct value (a sweep of 100 learning rates checks its device once).
    Used by :func:`submit`, and by the plan of ``clip-compress sweep`` (its dry run too)."""
    from compress.plan import check_inheritances
    from compress.run import run_device

    backends = [backend] * len(cfgs) if isinstance(backend, str) else list(backend)
    seen: set[str] = set()

    def once(key: Any) -> bool:
        text = json.dumps(key, sort_keys=True, default=str)
        fresh = text not in seen
        seen.add(text)
        return fresh

    for cfg, chosen in zip(cfgs, backends, strict=True):
        check_writable(run_dir_for(cfg))
        t = cfg.train
        if chosen == "local" and cfg.dispatch.gpus_per_node == 0 and str(t.device).startswith("cuda"):
            raise ConfigError(f"train.device: {t.device!r} but dispatch.gpus_per_node is 0: a local job then sees no "
                              "GPU (CUDA_VISIBLE_DEVICES is empty); set dispatch.gpus_per_node, or train.device: cpu "
                              "or auto")
        if chosen != "slurm" and once(("device", t.device, t.precision)):
            run_device(cfg)
        whole = cfg.to_dict()
        facts = {k: whole.get(k) for k in ("teacher", "student", "inheritance", "stages")}
        if once(("inheritance", facts, t.steps)):  # train.steps: the inheritance's total_steps
            check_inheritances(cfg)


def _check_resources(cfg: RunConfig, backend: str) -> None:
    d = cfg.dispatch
    tasks = d.nodes * d.tasks()
    if backend in ("inline", "debug") and tasks > 1 and environment().world_size != tasks:
        raise DispatchError(
            f"dispatch asks for {d.nodes} node(s) x {d.tasks()} tasks ({d.gpus_per_node} GPUs per node), but the "
            f"{backend} backend runs in this one process: use --backend local or slurm (one task per GPU), or start "
            f"{tasks} processes with torchrun"
        )
    if backend == "local" and d.nodes != 1:
        raise DispatchError(
            f"dispatch.nodes is {d.nodes}: the local backend runs on this machine only (nodes: 1)"
        )
    if backend == "slurm" and (shutil.which("sbatch") is None or shutil.which("srun") is None):
        raise DispatchError(
            "dispatch.backend is slurm, but there is no SLURM here (sbatch not found on PATH): "
            "use --backend inline or --backend local on this machine"
        )
    if backend == "slurm" and 60 * d.timeout_min - d.signal_delay_s - SIGNAL_EARLY_S < 60:
        raise DispatchError(
            f"dispatch.signal_delay_s {d.signal_delay_s} s and dispatch.timeout_min {d.timeout_min}: SLURM may send "
            f"the warning signal up to {SIGNAL_EARLY_S} s before signal_delay_s, which leaves the job less than a "
            f"minute before it (killed before it can checkpoint): need signal_delay_s <= "
            f"{max(60 * d.timeout_min - SIGNAL_EARLY_S - 60, 0)} or a longer timeout_min"
        )


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


def check_partition(cfg: RunConfig) -> None:
    """Refuse a job that no node of its partition can hold (more GPUs, CPUs or memory per node than any
    node has, or more nodes than fit): SLURM would keep it pending forever without a word. Where SLURM
    cannot be asked (no ``sinfo``), or the partition lists no node (hidden from this user), nothing is checked."""
    d = cfg.dispatch
    nodes = partition_nodes(d.partition)
    if not nodes:
        return
    cpus = d.tasks() * (d.cpus_per_task or 1)
    mem_mb = int(d.mem_gb * 1024) if d.mem_gb is not None else 0
    fits = [n for n in nodes if n.gpus >= d.gpus_per_node and n.cpus >= cpus and n.mem_mb >= mem_mb]
    if len(fits) >= d.nodes:
        return
    where = f"partition {d.partition}" if d.partition else "the default partition"
    asks = [f"{d.gpus_per_node} GPUs (gpus_per_node)", f"{cpus} CPUs (tasks_per_node x cpus_per_task)"]
    if mem_mb:
        asks.append(f"{mem_mb} MB (mem_gb)")
    raise DispatchError(
        f"{where} has no {d.nodes} node(s) with {', '.join(asks)} each: its {len(nodes)} node(s) have at most "
        f"{max(n.gpus for n in nodes)} GPUs, {max(n.cpus for n in nodes)} CPUs, {max(n.mem_mb for n in nodes)} MB "
        f"({len(fits)} fit); the job would stay pending forever: lower the dispatch settings or choose another "
        "dispatch.partition"
    )


def _local_gpus(groups: Sequence[Sequence[RunConfig]]) -> list[int]:
    """The first GPU of each group's local jobs: every job of every group at once gets its own
    ``gpus_per_node`` GPUs (``min(max_parallel, runs)`` jobs per group); fewer GPUs than that is refused
    rather than letting jobs share them. Without GPUs the tasks are CPU processes (all zeros)."""
    devices = _cuda_devices()
    if not devices:
        return [0] * len(groups)
    firsts, needs, need = [], [], 0
    for group in groups:
        slots, gpus = min(group[0].dispatch.max_parallel, len(group)), group[0].dispatch.gpus_per_node
        firsts.append(need)
        needs.append(f"{slots} parallel job(s) x {gpus} GPUs")
        need += slots * gpus
    if need > devices:
        raise DispatchError(
            f"the local jobs need {need} GPUs ({' + '.join(needs)}) but this machine has {devices}: lower "
            "dispatch.max_parallel or dispatch.gpus_per_node (jobs never share GPUs)"
        )
    return firsts


def _groups(cfgs: Sequence[RunConfig]) -> list[list[RunConfig]]:
    """Configs with equal ``dispatch`` settings (backend aside), in order of first appearance."""
    groups: dict[str, list[RunConfig]] = {}
    for cfg in cfgs:
        settings = {k: v for k, v in cfg.to_dict()["dispatch"].items() if k != "backend"}
        groups.setdefault(json.dumps(settings, sort_keys=True, default=str), []).append(cfg)
    return list(groups.values())


def _job(cfg: RunConfig, force: bool) -> RunJob:
    return RunJob(cfg.to_dict(), force=force, run_id=cfg.run_id())


class _Captured:
    """Calls the job and returns its exception instead of raising it: submitit's debug executor
    opens pdb on an exception, which must never happen in a sweep (or a test)."""

    def __init__(self, job: RunJob) -> None:
        self.job = job

    def __call__(self) -> Any:
        try:
            return self.job()
        except Exception as error:  # noqa: BLE001 - re-raised by the caller, outside submitit
            return error


def _run_here(cfg: RunConfig, backend: str, folder: Path, force: bool,
              notify: Callable[[RunConfig, str], None]) -> Submission:
    """``inline``: the job in this process. ``debug``: through submitit's ``DebugExecutor`` (its job
    environment and log files), in this process too."""
    job = _job(cfg, force)
    if backend == "inline":
        notify(cfg, "inline")
        return Submission(cfg, backend, "inline", row=job())
    import submitit

    executor = submitit.DebugExecutor(folder=str(folder))
    debug_job = executor.submit(_Captured(job))
    notify(cfg, str(debug_job.job_id))
    result = debug_job.result()
    if isinstance(result, Exception):
        raise result
    return Submission(cfg, backend, str(debug_job.job_id), row=result, job=debug_job)


def _submit_local(group: list[RunConfig], folder: Path, force: bool, first_gpu: int = 0) -> list[Submission]:
    """At most ``max_parallel`` local jobs, each running its share of the runs one after the other
    (round robin). Each job has ``tasks_per_node`` tasks (one per GPU; on a machine without GPUs,
    that many CPU processes); the jobs get disjoint GPUs from ``first_gpu`` on (:func:`_local_gpus`)."""
    import submitit

    d = group[0].dispatch
    slots = min(d.max_parallel, len(group))
    devices = _cuda_devices()
    gpus = d.gpus_per_node if devices else 0
    out = []
    for slot in range(slots):
        cfgs = group[slot::slots]
        executor = submitit.LocalExecutor(folder=str(folder), max_num_timeout=d.max_num_timeout)
        # the time limit is per run: a job running a queue of k runs gets k times timeout_min
        params: dict[str, Any] = {"timeout_min": d.timeout_min * len(cfgs), "gpus_per_node": gpus,
                                  "tasks_per_node": d.tasks(), "signal_delay_s": d.signal_delay_s}
        if gpus:
            params["visible_gpus"] = list(range(first_gpu + slot * gpus, first_gpu + (slot + 1) * gpus))
        executor.update_parameters(**params)
        jobs = [_job(cfg, force) for cfg in cfgs]
        job = executor.submit(jobs[0] if len(jobs) == 1 else RunQueue(jobs))
        for cfg in cfgs:
            out.append(Submission(cfg, "local", str(job.job_id), job=job))
    return out


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def slurm_executor(cfg: RunConfig, folder: Path) -> Any:
    """submitit's SLURM executor with the run's ``dispatch`` settings: ``tasks_per_node`` tasks per node
    (one per GPU), and ``--gpus-per-node`` only when the run asks for GPUs (``gpus_per_node`` > 0)."""
    import submitit

    _check_resources(cfg, "slurm")
    d = cfg.dispatch
    executor = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=d.max_num_timeout)
    params: dict[str, Any] = {
        "job_name": cfg.name,
        "time": d.timeout_min,
        "nodes": d.nodes,
        "ntasks_per_node": d.tasks(),
        "signal_delay_s": d.signal_delay_s,
        "array_parallelism": d.array_parallelism,
    }
    if d.gpus_per_node:
        params["gpus_per_node"] = d.gpus_per_node
    optional = {"partition": d.partition, "account": d.account, "cpus_per_task": d.cpus_per_task,
                "mem": _mem(d.mem_gb) if d.mem_gb is not None else None}
    params.update({k: v for k, v in optional.items() if v is not None})
    # requeueable whatever the cluster's default (JobRequeue): submitit requeues a preempted or timed-out job
    # with `scontrol requeue` after its checkpoint() (USR2 arrives signal_delay_s before the limit)
    params["additional_parameters"] = {"requeue": True,
                                       **{str(k).replace("_", "-"): v for k, v in d.slurm_options.items()}}
    if d.nodes * d.tasks() > 1:
        # a task that fails ends the step: its peers would otherwise wait in a collective (NCCL: for hours)
        params["srun_args"] = ["--kill-on-bad-exit=1"]
    executor.update_parameters(**params)
    return executor


def _mem(gb: float) -> str:
    return f"{int(gb)}GB" if float(gb).is_integer() else f"{int(gb * 1024)}MB"


def _submit_slurm(group: list[RunConfig], folder: Path, force: bool) -> list[Submission]:
    """Job arrays of at most ``max_array_size`` runs (one array task per run)."""
    executor = slurm_executor(group[0], folder)
    size = group[0].dispatch.max_array_size
    out = []
    for start in range(0, len(group), size):
        chunk = group[start:start + size]
        with executor.batch():
            jobs = [executor.submit(_job(cfg, force)) for cfg in chunk]
        for cfg, job in zip(chunk, jobs, strict=True):
            out.append(Submission(cfg, "slurm", str(job.job_id), job=job))
    return out


def wait(submission: Submission) -> dict[str, Any]:
    """The run's result row: at once for ``inline``/``debug``; ``local`` waits for the job; ``slurm``
    returns a ``submitted`` row (the result arrives in the run directory later)."""
    if submission.row is not None:
        return submission.row
    cfg = submission.cfg
    if submission.backend == "slurm":
        return {"run_id": cfg.run_id(), "name": cfg.name, "status": STATUS_SUBMITTED, "job_id": submission.job_id}
    try:
        result = submission.job.result()
    except Exception as error:  # noqa: BLE001 - the job's own result.json holds the failure
        return read_result(run_dir_for(cfg)) or {"run_id": cfg.run_id(), "name": cfg.name, "status": STATUS_FAILED,
                                                 "error": str(error)}
    return result if isinstance(result, dict) else read_result(run_dir_for(cfg)) or {}


def dispatch(cfgs: list[RunConfig], backend: str | None = None, force: bool = False) -> list[dict[str, Any]]:
    """Run every config (skipping those whose ``result.json`` says completed; an unfinished run
    resumes from its checkpoint) and return their result rows, in order. ``force`` reruns every
    config from step 0. ``local`` waits for the job; ``slurm`` submits and returns ``submitted`` rows."""
    rows = []
    for cfg in cfgs:
        chosen = backend or cfg.dispatch.backend
        done = completed_row(cfg)
        if done is not None and not force:
            print(f"[skip] {cfg.name} ({cfg.run_id()}): completed result in {run_dir_for(cfg)}")
            rows.append({**done, "status": "skipped"})
            continue
        folder = run_dir_for(cfg) / "submitit"
        (submission,) = submit([cfg], chosen, folder, force=force)
        if chosen in ("local", "slurm"):
            print(f"[submitted] {cfg.name} ({cfg.run_id()}) as {chosen} job {submission.job_id}; logs in {folder}")
        rows.append(wait(submission))
    return rows
