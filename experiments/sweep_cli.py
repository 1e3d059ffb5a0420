"""``clip-compress sweep``: expand a sweep file, pick the runs to submit, submit them, write the manifest."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from compress.config import RunConfig
from compress.results import STATUS_COMPLETED, STATUS_FAILED, STATUS_INTERRUPTED
from compress.rundir import SUBMITIT_DIR, RunDirBusy, lock_holder
from experiments.backends import find, get_backend
from experiments.dispatch import check_before_run, submit
from experiments.job import RUNNING_ELSEWHERE, completed_row
from experiments.status import PENDING, QUEUED, RUNNING, STOPPED, mark_queued, read_manifest, run_state
from experiments.sweep import (
    Sweep,
    SweepRun,
    append_manifest,
    code_version,
    describe,
    load_sweep,
    manifest_line,
)

#: a run handed to a backend that does not wait (its newest manifest line) that has no run directory yet, where
#: the scheduler cannot be asked (``local``, or no ``squeue``): its job may still wait in the queue (submitting it
#: again would only waste an allocation), or died before it started
QUEUED_MAYBE = "queued?"


def sweep_run_states(runs: Sequence[SweepRun], jobs: dict[str, dict[str, Any]]) -> tuple[list[str], str | None]:
    """Each run's state (:func:`experiments.status.run_state`); ``queued`` for one whose SLURM job is still
    in the queue (one ``squeue`` call for all, :func:`experiments.status.mark_queued`), ``queued?`` for a
    pending run already submitted where that cannot be known. Also the note of :func:`mark_queued`."""
    states = []
    for run in runs:
        state = run_state(run.run_dir)
        entry = jobs.get(run.run_id) or {}
        state.job_id = None if entry.get("job_id") is None else str(entry["job_id"])
        state.backend = entry.get("backend")
        states.append(state)
    note = mark_queued(states)
    for state in states:
        backend = find(state.backend)
        if state.state == PENDING and state.job_id and backend is not None and not backend.waits and (
                not backend.queue_visible or note is not None):
            state.state = QUEUED_MAYBE
    return [state.state for state in states], note


def selected(state: str, only_failed: bool, force: bool) -> bool:
    """Default: every run neither completed nor running nor queued now (unfinished ones resume);
    ``only_failed``: failed or interrupted ones; ``force``: all but the running and queued ones (from step 0).
    A running run holds its directory: submitting it again would only be refused by its lock; a queued
    one's job will run it."""
    if state in (RUNNING, QUEUED):
        return False
    if force:
        return True
    if only_failed:
        return state in (STATUS_FAILED, STATUS_INTERRUPTED)
    return state != STATUS_COMPLETED


def _elsewhere(run: SweepRun, force: bool) -> str | None:
    """``running elsewhere`` when another live process holds the run's directory now, ``completed
    elsewhere`` when it completed since the sweep's table was made (not with ``force``), else ``None``."""
    if lock_holder(run.run_dir) is not None:
        return RUNNING_ELSEWHERE
    if not force and completed_row(run.cfg) is not None:
        return "completed elsewhere"
    return None


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


def run_sweep(path: str | Path | Sweep, backend: str | None = None, overrides: Sequence[str] = (),
              dry_run: bool = False, only_failed: bool = False, force: bool = False) -> int:
    """Submit the sweep's runs that the mode selects (see :func:`selected`); the exit code is 1 when a run of a
    backend that waits failed, else 0 (the jobs of the others are not waited for). ``path``: a sweep file
    (expanded with ``overrides``), or a sweep already loaded."""
    if isinstance(path, Sweep):
        if overrides:
            raise ValueError("overrides apply when a sweep file is loaded; this sweep is loaded already")
        sweep = path
    else:
        sweep = load_sweep(path, overrides)
    runs = sweep.runs()
    backends = [backend or run.cfg.dispatch.backend for run in runs]
    todo = _plan(sweep, runs, backends, only_failed, force)
    skipped = len(runs) - len(todo)
    # what a run would refuse as it starts (run directory, device, inheritance): one line, before anything is
    # submitted or written, in the dry run too
    check_before_run([run.cfg for run in todo], [backend or run.cfg.dispatch.backend for run in todo])
    if dry_run:
        print(f"dry run: {len(todo)} to submit, {skipped} skipped; nothing submitted or written")
        return 0
    if not todo:
        print(f"nothing to submit: {skipped} runs skipped (completed, or not selected)")
        return 0
    submitter = _Submitter(sweep, todo, backend, force)
    wanted = {run.index for run in todo}
    for name in dict.fromkeys(backends):  # each backend once, in order
        group = [run for run, b in zip(runs, backends, strict=True) if b == name and run.index in wanted]
        if group and not get_backend(name).waits:
            submit([run.cfg for run in group], name, submitter.folder, force=force, on_submit=submitter.record)
        elif group:
            submitter.run_here(group, name)
    rows, others = submitter.rows, submitter.others
    failed = sum(row.get("status") != STATUS_COMPLETED for row in rows)
    ran = f"; {len(rows) - failed} completed, {failed} failed" if rows else ""
    ran += f", {others} run or completed by another process" if others else ""
    print(f"sweep {sweep.name}: {len(todo) - others} submitted, {skipped} skipped{ran}; manifest {sweep.manifest}")
    return 1 if failed else 0


def _plan(sweep: Sweep, runs: Sequence[SweepRun], backends: Sequence[str], only_failed: bool,
          force: bool) -> list[SweepRun]:
    """Print the sweep's table (each run's state and action) and its notes; return the runs to submit."""
    jobs = read_manifest(sweep.manifest)
    states, note = sweep_run_states(runs, jobs)
    chosen = [selected(state, only_failed, force) for state in states]
    actions = [action(state, c, force) for state, c in zip(states, chosen, strict=True)]
    print(format_table(sweep, runs, states, actions, backends))
    queued = [jobs[run.run_id]["job_id"] for run, state in zip(runs, states, strict=True) if state == QUEUED]
    if queued:
        print(f"note: {len(queued)} run(s) {QUEUED}: their SLURM job is in the queue (job "
              f"{', '.join(map(str, queued[:5]))}{', ...' if len(queued) > 5 else ''}) and will run them: "
              "not submitted")
    maybe = [jobs[run.run_id]["job_id"] for run, state in zip(runs, states, strict=True) if state == QUEUED_MAYBE]
    if note:
        print(f"note: {note}")
    if maybe:
        print(f"note: {len(maybe)} run(s) {QUEUED_MAYBE}: submitted (job {', '.join(map(str, maybe[:5]))}"
              f"{', ...' if len(maybe) > 5 else ''}) but not started, and the scheduler cannot be asked here; "
              "if still queued (squeue), submitting them again wastes an allocation")
    return [run for run, c in zip(runs, chosen, strict=True) if c]


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


class _Submitter:
    """Hands a sweep's runs to backends and records each in the manifest as it gets its job id; runs those of a
    backend that waits here, one after the other (one run's error does not stop the others)."""

    def __init__(self, sweep: Sweep, todo: Sequence[SweepRun], backend: str | None, force: bool) -> None:
        self.sweep, self.backend, self.force = sweep, backend, force
        self.of_cfg = {id(run.cfg): run for run in todo}
        self.code = code_version()
        self.folder = sweep.output_dir / SUBMITIT_DIR  # the sweep's own submitit folder
        self.rows: list[dict[str, Any]] = []
        self.others = 0

    def record(self, cfg: RunConfig, job_id: str, when: str | None = None) -> None:
        run = self.of_cfg[id(cfg)]
        line = manifest_line(run, self.backend or cfg.dispatch.backend, job_id, when or _now(), self.code)
        append_manifest(self.sweep, line)
        print(f"[submitted] {run.run_id} job {job_id} {run.run_dir}", flush=True)

    def run_here(self, group: Sequence[SweepRun], name: str) -> None:
        for run in group:
            elsewhere = _elsewhere(run, self.force)
            if elsewhere:  # another process (a second sweep) took it since the table: neither submitted nor failed
                print(f"[{elsewhere}] {run.run_id} ({describe(run.values)}): not run here", flush=True)
                self.others += 1
                continue
            # the run's manifest line is written once its job ran, and not if another process held the run (its
            # lock is taken inside the job: a line written before it could name a run this command never ran)
            started: list[tuple[RunConfig, str, str]] = []
            busy = False
            try:
                (done,) = submit([run.cfg], name, self.folder, force=self.force,
                                 on_submit=lambda cfg, job_id, to=started: to.append((cfg, job_id, _now())))
                self.rows.append(done.row or {})
            except RunDirBusy as error:  # taken between the check above and its lock
                busy = True
                print(f"[{RUNNING_ELSEWHERE}] {run.run_id} ({describe(run.values)}): {error}", flush=True)
                self.others += 1
            except Exception as error:  # noqa: BLE001 - reported, counted, and the sweep goes on
                print(f"[error] {run.run_id} ({describe(run.values)}): {type(error).__name__}: {error}", flush=True)
                self.rows.append({"status": STATUS_FAILED})
            finally:  # also when the run is interrupted (Ctrl-C): it ran here
                for cfg, job_id, when in started if not busy else []:
                    self.record(cfg, job_id, when)
