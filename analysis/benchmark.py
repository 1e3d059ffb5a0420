"""Task-list results (DataComp's ``eval_results.jsonl``, clip_benchmark's per-task JSON) into pandas
(no torch import).

``load_eval_results(paths, task_list)``: one row per results file (``clip-compress eval --tasks``
writes one per model and task list; DataComp's ``evaluate.py`` writes the same file), a column per
task key holding its main metric (or another metric by name), and ``mean``: DataComp's average over
the task list, NaN when a listed task has no value (a hole shows instead of an average over fewer
tasks; ``tasks_missing`` counts them). ``load_clip_benchmark(paths)``: clip_benchmark's JSON files
as one tidy row per file (``dataset``, ``model``, ``pretrained``, ``task``, ``language`` and the
metrics as columns), as clip_benchmark's own ``build`` command tabulates them.

A run directory's task-list results (``RUN_DIR/eval/<list>/``) also join the run's row in
:func:`analysis.load.load_results` (:func:`run_eval_columns`): ``eval/<list>/<task key>`` (main
metric, fraction) and ``eval/<list>/mean``, so ``clip-compress table --value eval/<list>/mean`` works.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.columns import AnalysisError, read_json_lines
from compress.result_files import EVAL_RESULTS_FILE, RUN_EVAL_DIR, SUMMARY_FILE
from compress.tasklist import TaskListError, load_task_list


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
    ``metric`` (fractions), ``mean`` over the tasks of ``task_list`` (all tasks found when none is
    given) and ``tasks_missing``. A task a file holds twice keeps its last line (DataComp appends)."""
    files = _files([paths] if isinstance(paths, str | Path) else paths, EVAL_RESULTS_FILE, ".jsonl")
    if not files:
        raise AnalysisError(f"no {EVAL_RESULTS_FILE} found")
    keys: list[str] | None = None
    if task_list is not None:
        try:
            keys = [t.key for t in load_task_list(task_list)]
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
    frame["tasks_missing"] = listed.isna().sum(axis=1)
    frame["mean"] = listed.mean(axis=1, skipna=False) if columns else math.nan
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


def run_eval_columns(run_dir: str | Path) -> dict[str, float]:
    """``{"eval/<list>/<key>": main metric, "eval/<list>/mean": mean}`` of every task list a run
    directory was evaluated on (``RUN_DIR/eval/<list>/eval_results.jsonl``); the mean is over the
    tasks of that evaluation (NaN if any has no main metric)."""
    out: dict[str, float] = {}
    folder = Path(run_dir) / RUN_EVAL_DIR
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob(f"*/{EVAL_RESULTS_FILE}")):
        try:
            rows = _read_lines(path)
        except AnalysisError:
            continue
        values = {row["key"]: _value(row["metrics"], "main_metric") for row in rows}
        name = path.parent.name
        out.update({f"eval/{name}/{key}": value for key, value in values.items()})
        out[f"eval/{name}/mean"] = (sum(values.values()) / len(values)) if values else math.nan
    return out
