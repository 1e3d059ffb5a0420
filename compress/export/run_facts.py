"""What a run directory tells its model card besides its own ``result.json``: each stage's row
(``stages/<k>-<name>/result.json``: its steps, batch and samples seen) and the task-list evaluations written
there by ``clip-compress eval RUN_DIR --tasks LIST`` (``RUN_DIR/eval/<list>/eval_results.jsonl``, DataComp's
format, and ``summary.json``: each task's main metric, the mean over the tasks scored and the list's size). No
torch import."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.result_files import EVAL_RESULTS_FILE, SUMMARY_FILE
from compress.rundir import RUN_EVAL_DIR, RunDir
from compress.tasklist import DEFAULT_MAIN


@dataclass(frozen=True)
class TaskScore:
    """One task of a task-list evaluation: its key, data set, main metric's name (``None`` if unknown) and value
    (a fraction, DataComp's; ``None`` when the task has none)."""

    key: str
    dataset: str
    metric: str | None
    value: float | None


@dataclass(frozen=True)
class TaskListEval:
    """A task-list evaluation of the run (``RUN_DIR/eval/<name>/``): its tasks, the mean of their main metrics over
    the ``scored`` tasks that have one (NaN if none), and ``in_list``: the task list's size (skipped tasks included,
    as ``summary.json`` records it)."""

    name: str
    tasks: list[TaskScore]
    mean: float
    scored: int = 0
    in_list: int = 0


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (json.JSONDecodeError, OSError):
        return None


def stage_rows(run_dir: Path | None) -> list[tuple[str, dict[str, Any]]]:
    """``(stage folder name, its result row)`` of each stage of a staged run, in stage order; none otherwise."""
    if run_dir is None:
        return []
    rows = [(stage.name, _json(stage.result)) for stage in RunDir(run_dir).stages()]
    return [(name, row) for name, row in rows if isinstance(row, dict)]


def _metric_name(metrics: dict[str, Any]) -> str | None:
    """The name of the main metric of a DataComp line, which records only its value: the metric equal to it (a
    task list's default, ``acc1`` / ``mean_recall@1``, where several are)."""
    main = metrics.get("main_metric")
    if main is None:
        return None
    equal = [k for k, v in metrics.items() if k != "main_metric" and v == main]
    return next((k for k in DEFAULT_MAIN.values() if k in equal), equal[0] if equal else None)


def _task_list(folder: Path) -> TaskListEval | None:
    try:
        lines = [json.loads(line) for line in (folder / EVAL_RESULTS_FILE).read_text().splitlines() if line.strip()]
    except (json.JSONDecodeError, OSError):
        return None
    tasks = [TaskScore(str(r.get("key")), str(r.get("dataset", r.get("key"))), _metric_name(r.get("metrics") or {}),
                       (r.get("metrics") or {}).get("main_metric")) for r in lines if isinstance(r, dict)]
    if not tasks:
        return None
    values = [float(t.value) for t in tasks if t.value is not None]
    mean = sum(values) / len(values) if values else math.nan
    summary = _json(folder / SUMMARY_FILE)
    in_list = len(tasks)
    if isinstance(summary, dict) and summary.get("tasks") == [t.key for t in tasks]:
        in_list = int(summary.get("tasks_in_list", in_list))  # skipped tasks of the list count
    return TaskListEval(folder.name, tasks, mean, len(values), in_list)


def task_list_evals(run_dir: Path | None) -> list[TaskListEval]:
    """Every task-list evaluation written into ``run_dir`` (``RUN_DIR/eval/<list>/``), by list name."""
    if run_dir is None or not (Path(run_dir) / RUN_EVAL_DIR).is_dir():
        return []
    found = [_task_list(folder) for folder in sorted((Path(run_dir) / RUN_EVAL_DIR).iterdir()) if folder.is_dir()]
    return [f for f in found if f is not None]
