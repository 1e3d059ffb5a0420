"""Run configs through a backend (:mod:`experiments.backends`: ``inline``, ``debug``, ``local``, ``slurm``, and
third-party ones): the checks before anything runs, the grouping by equal settings, the rows.

:func:`submit` returns the rows of a backend that ``waits`` (its runs ran before it returns); the others
return at once. The job is :class:`experiments.job.RunJob`, a picklable callable of the plain config dict that
resumes from its run directory and requeues itself on preemption or timeout.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from compress.config import RunConfig
from compress.config.dispatch import check_dispatch
from compress.recipe import run_dir_for, run_dir_of, run_id_of
from compress.rundir import check_writable
from experiments.backends import check_dispatch_section, get_backend
from experiments.backends.base import STATUS_SUBMITTED, Backend, DispatchError, Notify, Submission
from experiments.job import completed_row

__all__ = ["STATUS_SUBMITTED", "DispatchError", "Submission", "check_before_run", "dispatch", "submit", "wait"]


def submit(cfgs: Sequence[RunConfig], backend: str, folder: Path, force: bool = False,
           on_submit: Notify | None = None) -> list[Submission]:
    """Hand every config to ``backend`` (submitit's logs and pickles under ``folder``); configs whose settings
    differ go into separate submissions (executors, arrays). What the backend refuses, and what a run would
    refuse as it starts (:func:`check_before_run`), is refused before anything is submitted; each config's
    ``dispatch`` section is checked again for ``backend`` (a config changed since it was parsed, or one
    ``--backend`` sends to another backend than its section names). ``on_submit(cfg, job_id)`` is called as soon
    as a run has its job id, before the run starts in a backend that waits."""
    chosen = get_backend(backend)
    for cfg in cfgs:
        check_dispatch(cfg.dispatch)
        check_dispatch_section(cfg.dispatch, backend)
    notify = on_submit or (lambda cfg, job_id: None)
    groups = [[cfg] for cfg in cfgs] if chosen.waits else _groups(cfgs, chosen)  # in order where they run here
    chosen.refuse(groups)
    check_before_run(cfgs, backend)  # before submitit writes its folder in a run directory
    order = {id(cfg): i for i, cfg in enumerate(cfgs)}
    return sorted(chosen.submit(groups, folder, force, notify), key=lambda s: order[id(s.cfg)])


def check_before_run(cfgs: Sequence[RunConfig], backend: str | Sequence[str]) -> None:
    """What a run would refuse a second after it starts, refused before any is submitted, in one line: a run
    directory that cannot be made (``output.dir`` a file, a read-only folder), a student its inheritance cannot
    fill from its source (:func:`compress.plan.check_inheritances`) and what the backend refuses of the run's
    device (:meth:`~experiments.backends.base.Backend.check_device`: for the backends that run on this machine,
    a ``train.device``/``train.precision`` it does not have). ``backend``: one for all, or one per config. Each
    check runs once per distinct value (a sweep of 100 learning rates checks its device once). Used by
    :func:`submit`, and by the plan of ``clip-compress sweep`` (its dry run too)."""
    from compress.plan import check_inheritances

    names = [backend] * len(cfgs) if isinstance(backend, str) else list(backend)
    seen: set[str] = set()

    def once(key: Any) -> bool:
        text = json.dumps(key, sort_keys=True, default=str)
        fresh = text not in seen
        seen.add(text)
        return fresh

    for cfg, name in zip(cfgs, names, strict=True):
        check_writable(run_dir_for(cfg))
        t = cfg.train
        if once(("device", name, t.device, t.precision, cfg.dispatch.gpus_per_node)):
            get_backend(name).check_device(cfg)
        whole = cfg.to_dict()
        facts = {k: whole.get(k) for k in ("teacher", "student", "inheritance", "stages")}
        if once(("inheritance", facts, t.steps)):  # train.steps: the inheritance's total_steps
            check_inheritances(cfg)


def _groups(cfgs: Sequence[RunConfig], backend: Backend) -> list[list[RunConfig]]:
    """Configs with equal settings (:meth:`~experiments.backends.base.Backend.group_key`), in order of first
    appearance."""
    groups: dict[str, list[RunConfig]] = {}
    for cfg in cfgs:
        groups.setdefault(backend.group_key(cfg), []).append(cfg)
    return list(groups.values())


def wait(submission: Submission) -> dict[str, Any]:
    """The run's result row, as its backend gives it (:meth:`~experiments.backends.base.Backend.result`)."""
    return get_backend(submission.backend).result(submission)


def dispatch(cfgs: list[RunConfig], backend: str | None = None, force: bool = False) -> list[dict[str, Any]]:
    """Run every config (skipping those whose ``result.json`` says completed; an unfinished run resumes from
    its checkpoint) and return their result rows, in order. ``force`` reruns every config from step 0. A
    backend that does not wait is waited for where it can be (:func:`wait`)."""
    rows = []
    for cfg in cfgs:
        chosen = backend or cfg.dispatch.backend
        done = completed_row(cfg)
        if done is not None and not force:
            print(f"[skip] {cfg.name} ({run_id_of(cfg)}): completed result in {run_dir_for(cfg)}")
            rows.append({**done, "status": "skipped"})
            continue
        folder = run_dir_of(cfg).submitit
        (submission,) = submit([cfg], chosen, folder, force=force)
        if not get_backend(chosen).waits:
            print(f"[submitted] {cfg.name} ({run_id_of(cfg)}) as {chosen} job {submission.job_id}; logs in {folder}")
        rows.append(wait(submission))
    return rows
