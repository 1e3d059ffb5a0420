"""``clip-compress status``: the state of every run of a sweep or under a folder, read from the run
directories and, for runs handed to SLURM, from one ``squeue`` call (torch is not imported at module import).

A run is ``running`` exactly when a live process holds its lock (:func:`compress.rundir.lock_holder`);
otherwise its ``result.json`` says ``completed``, ``failed`` or ``interrupted``; a run that started
(its ``run_id``, metrics or a checkpoint are there) but has neither a process nor a row was killed
without writing one: ``stopped`` (started again, it resumes from its checkpoint); a run without a
folder, or whose folder holds nothing of a run yet, is ``pending``. A run not running or completed
whose SLURM job (the manifest's job id) is still in SLURM's queue (pending, requeued after a
preemption, starting) is ``queued``: its job will run it, and submitting it again would train it twice.
Where SLURM cannot be asked (no ``squeue``), such a run shows its last state, with a note.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from compress.recipe import run_id_of
from compress.results import RESULT_FILE, STATUS_COMPLETED, STATUS_FAILED, STATUS_INTERRUPTED, ResultsError
from compress.rundir import RunDir, walk_run_dirs
from compress.rundir import find_run_dirs as find_run_dirs
from experiments.manifest import MANIFEST_FILE, entry_run_dir, read_manifest, values_text

PENDING = "pending"
QUEUED = "queued"
RUNNING = "running"
STOPPED = "stopped"
#: every state, in the order the summary line counts them
STATES = (PENDING, QUEUED, RUNNING, STATUS_COMPLETED, STATUS_FAILED, STATUS_INTERRUPTED, STOPPED)

#: how much of an error the table shows
ERROR_WIDTH = 100


#: a path given to ``status`` or ``collect`` does not exist or holds no run (``analysis`` reads rows through
#: :func:`compress.results.collect_rows` too, so the error is that module's)
StatusError = ResultsError


@dataclass
class RunState:
    """Where one run stands: ``state`` (one of :data:`STATES`), the stage it is in (the folder name
    ``K-NAME`` of a staged run), the step reached of ``steps``, the error's first line, the job id
    (from the sweep's manifest) and the pid holding the run (while running)."""

    state: str
    run_dir: Path
    run_id: str | None = None
    name: str | None = None
    stage: str | None = None
    step: int | None = None
    steps: int | None = None
    error: str | None = None
    job_id: str | None = None
    pid: str | None = None
    values: dict[str, Any] = field(default_factory=dict)
    backend: str | None = None
    #: the job's state in SLURM's queue (``PENDING``, ...) for a ``queued`` run
    job_state: str | None = None


# -- one run directory ----------------------------------------------------------------------------
def run_state(run_dir: Path) -> RunState:
    """The state of the run in ``run_dir`` (see the module docstring)."""
    layout = RunDir(run_dir)
    run_dir = layout.path
    if not run_dir.is_dir():
        return RunState(PENDING, run_dir)
    config = _read_yaml(layout.config)
    row, unreadable = _read_row(layout.result)
    pid = layout.lock_holder()
    stage = _current_stage(layout, None if pid is not None else row)
    step = _step_reached(layout.stage(stage))
    if step is None and row is not None and stage is None:
        step = row.get("metrics", {}).get("train/steps")
    state = RunState(
        PENDING, run_dir, run_id=layout.recorded_run_id(), name=(row or {}).get("name") or config.get("name"),
        stage=stage, step=step, steps=_total_steps(config or (row or {}).get("config") or {}, stage), pid=pid,
    )
    if pid is not None:
        state.state = RUNNING
    elif unreadable is not None:
        state.state, state.error = STATUS_FAILED, f"unreadable {RESULT_FILE}: {unreadable}"
    elif row is not None:
        state.state = str(row.get("status", STATUS_FAILED))
        state.error = first_line(row.get("error"))
    elif step is not None or layout.run_id_file.is_file():
        state.state = STOPPED
    return state


def first_line(text: Any) -> str | None:
    """The first non-empty line of an error, or ``None``."""
    if not text:
        return None
    return next((line.strip() for line in str(text).splitlines() if line.strip()), None)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_row(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(row, None)``, ``(None, None)`` when there is no row, ``(None, why)`` when it cannot be read."""
    if not path.is_file():
        return None, None
    try:
        row = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return None, str(error)
    if not isinstance(row, dict):
        return None, f"a JSON {type(row).__name__}, not an object"
    return row, None


def _current_stage(run_dir: RunDir, row: dict[str, Any] | None) -> str | None:
    """The stage a finished run's row names, else the newest stage folder ``K-NAME`` (``None``: no stages)."""
    if row is not None and row.get("stage"):
        return str(row["stage"])
    folders = run_dir.stages()
    return folders[-1].name if folders else None


def _step_reached(directory: RunDir) -> int | None:
    """The step of the newest line of ``metrics.jsonl``, else of the newest checkpoint (read without torch)."""
    step = _last_logged_step(directory.metrics)
    if step is not None or not directory.path.is_dir():
        return step
    return directory.checkpoint_step()


def _last_logged_step(path: Path, tail: int = 65536) -> int | None:
    """The ``step`` of the last complete line of a JSON Lines file (only its end is read)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - tail, 0))
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            step = json.loads(line).get("step")
        except (ValueError, AttributeError):  # a line torn by a kill, or cut by the tail
            continue
        if isinstance(step, int):
            return step
    return None


def _total_steps(config: dict[str, Any], stage: str | None) -> int | None:
    """``train.steps`` of the run, or of stage ``K-NAME`` (its ``steps``, else its ``train.steps``,
    else the top level's, as :func:`compress.config.stages.resolve_stages` resolves them)."""
    steps = (config.get("train") or {}).get("steps")
    if stage is not None:
        try:
            spec = config["stages"][int(stage.split("-", 1)[0])]
            steps = spec.get("steps") or (spec.get("train") or {}).get("steps") or steps
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            return None
    return steps if isinstance(steps, int) else None


# -- many runs (the run directories: :func:`compress.rundir.walk_run_dirs`) ------------------------------
def _with_entry(state: RunState, entry: dict[str, Any]) -> RunState:
    state.job_id = None if entry.get("job_id") is None else str(entry["job_id"])
    state.backend = None if entry.get("backend") is None else str(entry["backend"])
    state.run_id = state.run_id or entry.get("run_id")
    state.name = state.name or entry.get("name")
    state.values = state.values or dict(entry.get("values") or {})
    return state


def directory_states(root: Path) -> list[RunState]:
    """Every run under ``root``, and every run a manifest under ``root`` lists whose folder does not
    exist yet (``pending``, with its job id)."""
    run_dirs, below = walk_run_dirs(root, also=MANIFEST_FILE)
    states = [run_state(d) for d in run_dirs]
    above = [parent / MANIFEST_FILE for parent in root.resolve().parents if (parent / MANIFEST_FILE).is_file()]
    by_id = {s.run_id: s for s in states if s.run_id is not None}
    for manifest in [*above, *below]:
        for run_id, entry in read_manifest(manifest).items():
            if run_id in by_id:
                _with_entry(by_id[run_id], entry)
            elif manifest in below:
                by_id[run_id] = _with_entry(run_state(entry_run_dir(entry, manifest)), entry)
                states.append(by_id[run_id])
    return states


def sweep_states(path: Path) -> list[RunState]:
    """Every run of the sweep file ``path``, in the sweep's order (``pending`` until it starts)."""
    from experiments.sweep import load_sweep  # validates every run's config: the plug-in registries

    sweep = load_sweep(path)
    jobs = read_manifest(Path(sweep.output_dir) / MANIFEST_FILE)
    states = []
    for run in sweep.runs():
        state = run_state(Path(run.run_dir))
        run_id = run_id_of(run.cfg)
        state.run_id, state.name = state.run_id or run_id, state.name or run.cfg.name
        state.values = dict(run.values)
        if run_id in jobs:
            _with_entry(state, jobs[run_id])
        states.append(state)
    return states


def mark_queued(states: Sequence[RunState]) -> str | None:
    """Set ``queued`` on the runs (neither running nor completed) whose job is still in their backend's queue
    (:meth:`~experiments.backends.base.Backend.queued_jobs`, one call per backend); returns a note when a
    scheduler could not be asked, else ``None``."""
    from experiments.backends import DispatchError, get_backend

    by_backend: dict[str, list[RunState]] = {}
    for s in states:
        if s.backend and s.job_id and s.state not in (RUNNING, STATUS_COMPLETED):
            by_backend.setdefault(s.backend, []).append(s)
    notes = []
    for name, candidates in by_backend.items():
        try:
            backend = get_backend(name)
        except DispatchError:  # a backend of a package not installed here: its queue cannot be asked
            continue
        if not backend.queue_visible:
            continue
        jobs = backend.queued_jobs([s.job_id for s in candidates])
        if jobs is None:
            notes.append(f"{len(candidates)} run(s) were handed to {backend.scheduler} but {backend.scheduler} "
                         f"cannot be asked here ({backend.queue_query_hint}): a run whose job still waits in the "
                         "queue shows its last state")
            continue
        for s in candidates:
            if s.job_id in jobs:
                s.state, s.job_state = QUEUED, jobs[s.job_id]
    return "; ".join(notes) or None


def status(target: Path) -> list[RunState]:
    """The runs of a sweep file or under a folder (runs whose SLURM job is in the queue: ``queued``)."""
    target = Path(target)
    if target.is_dir() or (target.is_file() and target.suffix in (".yaml", ".yml")):
        states = directory_states(target) if target.is_dir() else sweep_states(target)
        note = mark_queued(states)
        if note:
            print(f"clip-compress: note: {note}", file=sys.stderr)
        return states
    if target.exists():
        raise StatusError(f"{target}: neither a folder of runs nor a sweep file (.yaml)")
    raise StatusError(f"{target}: no such file or directory")


# -- the table ------------------------------------------------------------------------------------
def _steps_text(state: RunState) -> str:
    if state.step is None and state.steps is None:
        return "-"
    return f"{'-' if state.step is None else state.step}/{'?' if state.steps is None else state.steps}"


def _shorten(text: str | None, width: int = ERROR_WIDTH) -> str:
    if not text:
        return ""
    return text if len(text) <= width else text[: width - 3] + "..."


def summary(states: Iterable[RunState]) -> str:
    """``N runs: a completed, b failed, ...`` (states with no run left out)."""
    states = list(states)
    counts = Counter(s.state for s in states)
    order = [*STATES, *sorted(set(counts) - set(STATES))]
    parts = [f"{counts[name]} {name}" for name in order if counts[name]]
    return f"{len(states)} run{'s' if len(states) != 1 else ''}: " + (", ".join(parts) if parts else "none")


def format_status(states: Sequence[RunState]) -> str:
    """A table (state, run id, name, stage, step/steps, job id, axis values, error) and a summary line."""
    with_values = any(s.values for s in states)
    header = ["STATE", "RUN ID", "NAME", "STAGE", "STEP", "JOB", *(["VALUES"] if with_values else []), "ERROR"]
    rows = [header]
    for s in states:
        values = values_text(s.values)
        state = f"{s.state} (pid {s.pid})" if s.state == RUNNING and s.pid else s.state
        state = f"{state} ({s.job_state})" if s.state == QUEUED and s.job_state else state
        rows.append([state, s.run_id or "-", s.name or "-", s.stage or "-", _steps_text(s), s.job_id or "-",
                     *([values or "-"] if with_values else []), _shorten(s.error)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = ["  ".join([*(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)), r[-1]]).rstrip() for r in rows]
    return "\n".join([*lines, summary(states)])
