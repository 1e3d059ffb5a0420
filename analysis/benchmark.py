"""Task-list results (DataComp's ``eval_results.jsonl``, clip_benchmark's per-task JSON) into pandas
(no torch import).

``load_eval_results(paths, task_list)``: one row per results file (``clip-compress eval --tasks``
writes one per model and task list; DataComp's ``evaluate.py`` writes the same file), a column per
task key holding its main metric (or another metric by name), and ``mean_scored``: the mean over the
``tasks_scored`` tasks that have a value, of the ``tasks_listed`` of the task list (``tasks_missing``
= listed - scored; skipped tasks of DataComp's list count as missing). It is never DataComp's average
(DataComp averages the 38 of its 40 tasks that give a main metric; this evaluator scores 33 of them).
``load_clip_benchmark(paths)``: clip_benchmark's JSON files
as one tidy row per file (``dataset``, ``model``, ``pretrained``, ``task``, ``language`` and the
metrics as columns), as clip_benchmark's own ``build`` command tabulates them.

A run directory's task-list results (``RUN_DIR/eval/<list>/``) also join the run's row in
:func:`analysis.load.load_results` (:func:`run_eval_columns`): ``eval/<list>/<task key>`` (main
metric, fraction), ``eval/<list>/mean_scored``, ``eval/<list>/tasks_scored`` and
``eval/<list>/tasks_in_list``, so ``clip-compress table --value eval/<list>/mean_scored`` works; results of
another model than the run's current one (``model_sha256`` of ``summary.json``) are skipped, the reason in
``eval/<list>/skipped``.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.columns import AnalysisError, read_json_lines
from compress.result_files import EVAL_RESULTS_FILE, SUMMARY_FILE
from compress.rundir import RUN_EVAL_DIR, RunModelError, final_model, model_sha256
from compress.tasklist import TaskListError, read_task_list


def _files(paths: Iterable[str | Path], name: str, suffix: str) -> list[Path]:
    """``paths`` themselves if files, else every file named ``name`` (or ending in ``suffix``) below them."""
    out: list[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            out.append(path)
        elif path.is_dir():
            out += sorted(p for p in path.rglob(name if name else f"*{suffix}") if p.is_file())
        else:
            raise AnalysisError(f"no such file or folder: {path}")
    return out


def _read_lines(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, row in read_json_lines(path, "a DataComp result line"):
        if not isinstance(row.get("metrics"), dict) or "key" not in row:
            raise AnalysisError(f"{path}:{number}: not a DataComp result line (key, dataset, metrics)")
        rows.append(row)
    return rows


def _value(metrics: dict[str, Any], metric: str) -> float:
    value = metrics.get(metric)
    return float("nan") if value is None else float(value)


def load_eval_results(
    paths: str | Path | Iterable[str | Path], task_list: str | Path | None = None, metric: str = "main_metric"
) -> pd.DataFrame:
    """A row per ``eval_results.jsonl`` (files, or folders searched for them): ``path``, ``model``
    (from the ``summary.json`` beside it, else the folder's name), one column per task key with
    ``metric`` (fractions; every key of ``task_list``, skipped ones included, else all tasks found),
    ``tasks_listed``, ``tasks_scored`` (with a value), ``tasks_missing`` and ``mean_scored`` (the mean
    over the scored tasks only). A task a file holds twice keeps its last line (DataComp appends)."""
    files = _files([paths] if isinstance(paths, str | Path) else paths, EVAL_RESULTS_FILE, ".jsonl")
    if not files:
        raise AnalysisError(f"no {EVAL_RESULTS_FILE} found")
    keys: list[str] | None = None
    if task_list is not None:
        try:
            keys = read_task_list(task_list).keys
        except TaskListError as error:
            raise AnalysisError(str(error)) from None
    records = []
    for path in files:
        values = {row["key"]: _value(row["metrics"], metric) for row in _read_lines(path)}
        summary = path.parent / SUMMARY_FILE
        model = json.loads(summary.read_text()).get("model") if summary.is_file() else path.parent.name
        records.append({"path": str(path.parent), "model": model, **values})
    frame = pd.DataFrame.from_records(records)
    found = [c for c in frame.columns if c not in ("path", "model")]
    columns = keys if keys is not None else found
    for key in columns:
        if key not in frame:
            frame[key] = float("nan")
    frame = frame[["path", "model", *columns, *(c for c in found if c not in columns)]]
    listed = frame[columns].astype(float)
    frame["tasks_listed"] = len(columns)
    frame["tasks_scored"] = listed.notna().sum(axis=1)
    frame["tasks_missing"] = listed.isna().sum(axis=1)
    frame["mean_scored"] = listed.mean(axis=1, skipna=True) if columns else math.nan
    return frame


def load_clip_benchmark(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """clip_benchmark's per-task JSON files (files, or folders searched for ``*.json`` holding its
    fields): a row per file with ``dataset``, ``model``, ``pretrained``, ``task``, ``language``, the
    metrics as columns (NaN where clip_benchmark wrote NaN) and ``file``."""
    files = _files([paths] if isinstance(paths, str | Path) else paths, "", ".json")
    rows = []
    for path in files:
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        if not isinstance(data, dict) or not {"dataset", "task", "metrics"} <= set(data):
            continue
        fields = {k: data.get(k) for k in ("dataset", "model", "pretrained", "task", "language")}
        rows.append({**fields, **{k: _value(data["metrics"], k) for k in data["metrics"]}, "file": str(path)})
    if not rows:
        raise AnalysisError("no clip_benchmark result JSON (dataset, task, metrics) found")
    return pd.DataFrame.from_records(rows)


def _current_model_hash(run_dir: Path) -> tuple[str | None, str | None]:
    """(SHA-256 of the run's final model, None) or (None, why there is none)."""
    try:
        return model_sha256(final_model(run_dir)), None
    except RunModelError as error:
        return None, str(error)


def run_eval_columns(run_dir: str | Path) -> dict[str, Any]:
    """``{"eval/<list>/<key>": main metric, "eval/<list>/mean_scored", "eval/<list>/tasks_scored",
    "eval/<list>/tasks_in_list"}`` of every task list a run directory was evaluated on
    (``RUN_DIR/eval/<list>/eval_results.jsonl``); the mean is over the tasks scored (those with a main
    metric). Results whose ``summary.json`` records another model (``model_sha256``) than the run's current
    final model, or none, are skipped: ``eval/<list>/skipped`` says why (and a warning)."""
    out: dict[str, Any] = {}
    folder = Path(run_dir) / RUN_EVAL_DIR
    if not folder.is_dir():
        return out
    current: tuple[str | None, str | None] | None = None
    for path in sorted(folder.glob(f"*/{EVAL_RESULTS_FILE}")):
        name = path.parent.name
        try:
            rows = _read_lines(path)
            summary = json.loads((path.parent / SUMMARY_FILE).read_text())
        except (AnalysisError, OSError, ValueError) as error:
            out[f"eval/{name}/skipped"] = f"unreadable: {error}"
            continue
        current = current or _current_model_hash(Path(run_dir))
        recorded = summary.get("model_sha256") if isinstance(summary, dict) else None
        why = None
        if current[0] is None:
            why = f"the run's model cannot be found ({current[1]})"
        elif recorded is None:
            why = "summary.json records no model_sha256 (evaluated before models were hashed)"
        elif recorded != current[0]:
            why = f"evaluated another model (sha256 {recorded[:12]}, the run's is {current[0][:12]})"
        if why is not None:
            out[f"eval/{name}/skipped"] = why
            warnings.warn(f"{path.parent}: skipped: {why}", stacklevel=2)
            continue
        values = {row["key"]: _value(row["metrics"], "main_metric") for row in rows}
        out.update({f"eval/{name}/{key}": value for key, value in values.items()})
        scored = [v for v in values.values() if not math.isnan(v)]
        out[f"eval/{name}/mean_scored"] = sum(scored) / len(scored) if scored else math.nan
        out[f"eval/{name}/tasks_scored"] = len(scored)
        out[f"eval/{name}/tasks_in_list"] = summary.get("tasks_in_list", len(values))
    return out
