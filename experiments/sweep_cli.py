"""``clip-compress sweep``: expand a sweep file, pick the runs to submit, submit them, write the manifest."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from compress.config import RunConfig
from compress.results import STATUS_COMPLETED, STATUS_FAILED, STATUS_INTERRUPTED
from experiments.dispatch import submit
from experiments.status import PENDING, RUNNING, STOPPED, read_manifest, run_state
from experiments.sweep import (
    Sweep,
    SweepRun,
    append_manifest,
    code_version,
    describe,
    load_sweep,
    manifest_line,
)

#: a run handed to ``local``/``slurm`` (its newest manifest line) that has no run directory yet: its job may still
#: wait in the queue (submitting it again would only waste an allocation), or died before it started
QUEUED = "queued?"


def sweep_state(run: SweepRun, jobs: dict[str, dict[str, Any]]) -> str:
    """The run's state (:func:`experiments.status.run_state`), ``queued?`` for a pending run already submitted."""
    state = run_state(run.run_dir).state
    entry = jobs.get(run.run_id) or {}
    if state == PENDING and entry.get("job_id") and entry.get("backend") in ("local", "slurm"):
        return QUEUED
    return state


def selected(state: str, only_failed: bool, force: bool) -> bool:
    """Default: every run neither completed nor running now (unfinished ones resume); ``only_failed``:
    failed or interrupted ones; ``force``: all but the running ones (from step 0). A running run
    holds its directory: submitting it again would only be refused by its lock."""
    if state == RUNNING:
        return False
    if force:
        return True
    if only_failed:
        return state in (STATUS_FAILED, STATUS_INTERRUPTED)
    return state != STATUS_COMPLETED


def action(state: str, chosen: bool, force: bool) -> str:
    if not chosen:
        return "skip"
    if force:
        return "rerun"
    return "resume" if state == STOPPED else "submit"


def format_table(sweep: Sweep, runs: Sequence[SweepRun], states: Sequence[str], actions: Sequence[str],
                 backends: Sequence[str]) -> str:
    """One line per run: index, run id, state, what happens to it (and where), its axis values."""
    lines = [f"sweep {sweep.name}: {len(runs)} runs in {sweep.output_dir}",
             f"{'#':>4}  {'run id':<12}  {'state':<11}  {'action':<17}  values"]
    for run, state, act, backend in zip(runs, states, actions, backends, strict=True):
        where = f"{act} ({backend})" if act != "skip" else act
        lines.append(f"{run.index:>4}  {run.run_id:<12}  {state:<11}  {where:<17}  {describe(run.values)}")
    return "\n".join(lines)


def run_sweep(path: str | Path, backend: str | None = None, overrides: Sequence[str] = (), dry_run: bool = False,
              only_failed: bool = False, force: bool = False) -> int:
    """Submit the sweep's runs that the mode selects (see :func:`selected`); the exit code is 1 when an
    ``inline``/``debug`` run failed, else 0 (``local``/``slurm`` jobs are not waited for)."""
    sweep = load_sweep(path, overrides)
    runs = sweep.runs()
    jobs = read_manifest(sweep.manifest)
    states = [sweep_state(run, jobs) for run in runs]
    chosen = [selected(state, only_failed, force) for state in states]
    backends = [backend or run.cfg.dispatch.backend for run in runs]
    actions = [action(state, c, force) for state, c in zip(states, chosen, strict=True)]
    print(format_table(sweep, runs, states, actions, backends))
    queued = [jobs[run.run_id]["job_id"] for run, state in zip(runs, states, strict=True) if state == QUEUED]
    if queued:
        print(f"note: {len(queued)} run(s) {QUEUED}: submitted (job {', '.join(map(str, queued[:5]))}"
              f"{', ...' if len(queued) > 5 else ''}) but not started; if still queued (squeue), submitting them "
              "again wastes an allocation")
    todo = [run for run, c in zip(runs, chosen, strict=True) if c]
    skipped = len(runs) - len(todo)
    if dry_run:
        print(f"dry run: {len(todo)} to submit, {skipped} skipped; nothing submitted or written")
        return 0
    if not todo:
        print(f"nothing to submit: {skipped} runs skipped (completed, or not selected)")
        return 0
    code = code_version()
    of_cfg = {id(run.cfg): run for run in todo}
    rows = []

    def on_submit(cfg: RunConfig, job_id: str) -> None:
        run = of_cfg[id(cfg)]
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        append_manifest(sweep, manifest_line(run, backend or cfg.dispatch.backend, job_id, now, code))
        print(f"[submitted] {run.run_id} job {job_id} {run.run_dir}", flush=True)

    folder = sweep.output_dir / "submitit"
    wanted = {run.index for run in todo}
    for name in dict.fromkeys(backends):  # each backend once, in order
        group = [run for run, b in zip(runs, backends, strict=True) if b == name and run.index in wanted]
        if not group:
            continue
        if name in ("local", "slurm"):
            submit([run.cfg for run in group], name, folder, force=force, on_submit=on_submit)
            continue
        for run in group:  # in this process, one after the other: one run's error does not stop the others
            try:
                (done,) = submit([run.cfg], name, folder, force=force, on_submit=on_submit)
                rows.append(done.row or {})
            except Exception as error:  # noqa: BLE001 - reported, counted, and the sweep goes on
                print(f"[error] {run.run_id} ({describe(run.values)}): {type(error).__name__}: {error}", flush=True)
                rows.append({"status": STATUS_FAILED})
    failed = sum(row.get("status") != STATUS_COMPLETED for row in rows)
    ran = f"; {len(rows) - failed} completed, {failed} failed" if rows else ""
    print(f"sweep {sweep.name}: {len(todo)} submitted, {skipped} skipped{ran}; manifest {sweep.manifest}")
    return 1 if failed else 0
