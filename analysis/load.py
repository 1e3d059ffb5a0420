"""Result rows and training curves into pandas DataFrames (no torch import).

``load_results`` reads any mix of run directories (sweep output folders are searched for runs;
a staged run gives its run row and one row per stage), ``result.json`` files and JSON Lines
files written by ``clip-compress collect``, into one tidy frame with these columns:

- identity: ``run_id``, ``name``, ``status``, ``failed`` (status is not ``completed``), ``error``,
  ``row`` (``run`` or ``stage``), ``path`` (the folder of the row; the file for a JSON line without one);
- the config flattened with dotted names (``train.lr``, ``inheritance.name``, ``losses.0.name``);
- the metrics under their own names (``zs/<task>/top1``, ``params/vision``, ...);
- a run's task-list results (``clip-compress eval RUN_DIR --tasks LIST``): ``eval/<list>/<task key>`` (the main
  metric, a fraction), ``eval/<list>/mean_scored`` (over ``eval/<list>/tasks_scored`` of ``tasks_in_list``;
  results of another model than the run's are skipped: :func:`analysis.benchmark.run_eval_columns`);
- short aliases (:data:`ALIASES`), the budget (``steps``, ``samples_seen``, ``train_time_s``) and
  ``params`` (vision + text tower without the token embedding, TinyCLIP's count).

The ``loss`` alias is the loss terms joined by ``+`` (``affinity+clip``); a term shows, as
``name(k=v, ...)``, the parameters its config writes whose value is not written the same in every
loaded row using that loss (``weight_`` dropped from the name, the weight as ``weight=``), so
``affinity(i2t=1, t2i=0)`` stands next to ``affinity`` while settings shared by the whole study stay
hidden. Defaults are not known here (that would import the plug-ins, hence torch): a value written
in some rows and left to its default in others is shown where it is written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.benchmark import run_eval_columns
from analysis.columns import (
    ALIASES,
    IDENTITY_COLUMNS,
    AnalysisError,
    config_columns,
    read_json_lines,
    resolve_key,
    value_text,
)
from compress.results import RESULT_FILE, STATUS_COMPLETED, ResultsError, collect_rows
from compress.rundir import METRICS_FILE, MODEL_DIR, RunDir


def read_rows(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """The raw result rows (dicts with ``row`` and ``path``) of run folders, ``result.json`` and ``.jsonl`` files."""
    rows: list[dict[str, Any]] = []
    folders: list[Path] = []
    for path in map(Path, paths):
        if path.suffix == ".jsonl" and path.is_file():
            rows += _read_jsonl(path)
        else:
            folders.append(path)
    if folders:
        try:
            found, unreadable = collect_rows(folders)
        except ResultsError as error:
            raise AnalysisError(str(error)) from None
        if unreadable:
            raise AnalysisError(f"unreadable {RESULT_FILE}: {unreadable[0]}" + (
                f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""))
        rows += found
    seen: set[tuple[str, str]] = set()
    unique = []
    for row in rows:  # the same folder given twice (a run folder and its sweep folder) is one row
        key = (str(row.get("path")), str(row.get("row")))
        if key not in seen:
            seen.add(key)
            unique.append(row)
    return unique


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [{"row": "run", "path": f"{path}:{number}", **row} for number, row in read_json_lines(path, "a result row")]


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"train.lr": ..., "losses.0.name": ...}``; a list of scalars becomes a string."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list | tuple):
        if value and all(isinstance(v, Mapping) for v in value):
            out = {}
            for i, item in enumerate(value):
                out.update(flatten(item, f"{prefix}.{i}"))
            return out
        return {prefix: json.dumps(list(value))}
    return {prefix: value}


def _stage_specs(config: Mapping[str, Any], key: str) -> list[Any]:
    """The ``inheritance`` or ``losses`` spec of each stage (the top-level one where a stage has none)."""
    stages = config.get("stages") or []
    return [s.get(key) if s.get(key) is not None else config.get(key) for s in stages] or [config.get(key)]


def _loss_terms(losses: Any) -> list[dict[str, Any]]:
    return [dict(t) for t in losses or [] if isinstance(t, Mapping)]


def _varying_params(rows: Sequence[Mapping[str, Any]]) -> dict[str, set[str]]:
    """Per loss name, the parameters not written with one value in every term of that name."""
    values: dict[str, dict[str, set[str]]] = {}
    counts: dict[str, int] = {}
    for row in rows:
        for losses in _stage_specs(row.get("config") or {}, "losses"):
            for term in _loss_terms(losses):
                name = str(term.get("name"))
                counts[name] = counts.get(name, 0) + 1
                for key, value in term.items():
                    if key != "name":
                        values.setdefault(name, {}).setdefault(key, set()).add(json.dumps(value, sort_keys=True))
    varying: dict[str, set[str]] = {}
    for name, params in values.items():
        for key, seen in params.items():
            if len(seen) > 1 or _count_written(rows, name, key) < counts[name]:
                varying.setdefault(name, set()).add(key)
    return varying


def _count_written(rows: Sequence[Mapping[str, Any]], name: str, key: str) -> int:
    return sum(
        1
        for row in rows
        for losses in _stage_specs(row.get("config") or {}, "losses")
        for term in _loss_terms(losses)
        if str(term.get("name")) == name and key in term
    )


def loss_label(losses: Any, varying: Mapping[str, set[str]] | None = None) -> str:
    """``affinity+clip``; a term with parameters in ``varying[name]`` as ``affinity(i2t=1, t2i=0)``."""
    parts = []
    for term in _loss_terms(losses):
        name = str(term.get("name"))
        shown = sorted(k for k in term if k != "name" and k in (varying or {}).get(name, set()))
        params = ", ".join(f"{k.removeprefix('weight_')}={value_text(term[k])}" for k in shown)
        parts.append(f"{name}({params})" if params else name)
    return "+".join(parts) if parts else "none"


def _joined(labels: list[str]) -> str:
    return labels[0] if len(set(labels)) == 1 else "→".join(labels)


def _short_model(spec: Any) -> str | None:
    if not isinstance(spec, Mapping) or not spec.get("model"):
        return None
    model = str(spec["model"]).removeprefix("local-dir:")
    if "/" in model:
        parts = [p for p in Path(model).parts if p not in ("", "/")]
        while len(parts) > 1 and parts[-1] in (MODEL_DIR, "export"):
            parts.pop()
        model = parts[-1] if parts else model
    return f"{model}@{spec['pretrained']}" if spec.get("pretrained") else model


def _stage_steps(config: Mapping[str, Any]) -> list[tuple[int, int]]:
    """(steps, global batch) of each stage, the keys layered as ``compress.config.stages.resolve_stages`` does."""
    train = config.get("train") or {}
    stages = config.get("stages") or [{}]
    out = []
    for stage in stages:
        merged = {**train, **(stage.get("train") or {})}
        steps = stage.get("steps") if stage.get("steps") is not None else merged.get("steps")
        out.append((int(steps or 0), int(merged.get("batch_size") or 0)))
    return out


def _aliases(row: Mapping[str, Any], varying: Mapping[str, set[str]]) -> dict[str, Any]:
    config = row.get("config") or {}
    metrics = row.get("metrics") or {}
    train = config.get("train") or {}
    stages = config.get("stages") or []
    inheritance = [str((spec or {}).get("name")) for spec in _stage_specs(config, "inheritance")]
    students = [_short_model(s.get("student")) for s in stages if s.get("student")] or [
        _short_model(config.get("student"))]
    target = metrics.get("sparsity/target")
    if target is None:
        target = (stages[-1].get("target_sparsity") if stages else None) or (
            config.get("inheritance") or {}).get("target_sparsity")
    budget = _stage_steps(config)
    vision, text = metrics.get("params/vision"), metrics.get("params/text")
    return {
        "loss": _joined([loss_label(losses, varying) for losses in _stage_specs(config, "losses")]),
        "inheritance": _joined(inheritance),
        "student": students[-1] or "(pruned teacher)",
        "teacher": _short_model(config.get("teacher")) or "none",
        "stage": metrics.get("stage/name") or "",
        "n_stages": max(len(stages), 1),
        "target_sparsity": float(target) if target is not None else math.nan,
        "seed": config.get("seed"),
        "lr": train.get("lr"),
        "batch_size": train.get("batch_size"),
        "world_size": metrics.get("dist/world_size", 1),
        "steps": sum(s for s, _ in budget),
        "samples_seen": sum(s * b for s, b in budget),
        "train_time_s": metrics.get("train/duration_s", math.nan),
        "params": vision + text if vision is not None and text is not None else math.nan,
    }


def results_frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The tidy frame of some result rows (see the module docstring)."""
    varying = _varying_params(rows)
    records = []
    for row in rows:
        record: dict[str, Any] = {}
        record.update(flatten(row.get("config") or {}))
        record.update(row.get("metrics") or {})
        if row.get("row", "run") == "run" and row.get("path"):
            record.update(run_eval_columns(row["path"]))
        status = row.get("status")
        record.update({
            "run_id": row.get("run_id"),
            "name": row.get("name"),
            "status": status,
            "failed": status != STATUS_COMPLETED,
            "error": row.get("error"),
            "row": row.get("row", "run"),
            "path": str(row.get("path", "")),
        })
        record.update(_aliases(row, varying))
        records.append(record)
    frame = pd.DataFrame.from_records(records)
    if frame.empty:
        return frame
    _sum_stage_times(frame)
    first = [*IDENTITY_COLUMNS, *ALIASES]
    return frame[first + [c for c in frame.columns if c not in first]]


def _sum_stage_times(frame: pd.DataFrame) -> None:
    """A staged run row's training time: the sum over its stage rows loaded beside it."""
    stage_rows = frame[frame["row"] == "stage"]
    if stage_rows.empty:
        return
    parents = stage_rows["path"].map(lambda p: str(Path(p).parent.parent))
    totals = stage_rows["train_time_s"].groupby(parents).sum(min_count=1)
    is_staged_run = (frame["row"] == "run") & frame["path"].isin(totals.index)
    frame.loc[is_staged_run, "train_time_s"] = frame.loc[is_staged_run, "path"].map(totals)


def load_results(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """One tidy row per result (run and stage rows; failed runs kept, ``failed`` true)."""
    paths = [paths] if isinstance(paths, str | Path) else list(paths)
    rows = read_rows(paths)
    if not rows:
        raise AnalysisError(f"no result rows in {', '.join(map(str, paths))}")
    return results_frame(rows)


def load_curves(paths: str | Path | Iterable[str | Path], stages: bool = False,
                keys: Sequence[str] = ()) -> pd.DataFrame:
    """Every logged value of ``metrics.jsonl`` in long form: one line per (run, step, term) with
    columns ``run_id, path, step, term, value``, the alias columns of the run and the config columns
    whose value differs between the loaded runs (what a group must not pool, and what a filter may name;
    a setting every run shares is left out, so the frame does not grow with the config's size).
    ``stages``: the per-stage curves of staged runs (their step counts restart at each stage) instead of none.
    ``keys`` (a plot's ``--filter`` and ``--group`` keys) are resolved against every column of the result rows,
    before the shared settings are left out, and kept: a filter may name a setting all runs share."""
    results = load_results(paths)
    results = results[results["row"] == ("stage" if stages else "run")]
    varying = [c for c in config_columns(results) if results[c].map(value_text).nunique() > 1]
    long_columns = ("step", "term", "value")
    named = [resolve_key(results, key) for key in keys if key not in long_columns]
    keep = list(dict.fromkeys(["run_id", "path", "name", "status", *ALIASES, *varying,
                               *(c for c in named if c not in long_columns)]))
    frames = []
    for _, result in results.iterrows():
        file = RunDir(result["path"]).metrics
        if not file.is_file():
            continue
        records = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
        wide = pd.DataFrame.from_records(records)
        if wide.empty or "step" not in wide:
            continue
        values = wide.drop(columns=[c for c in wide if c != "step" and not pd.api.types.is_numeric_dtype(wide[c])])
        long = values.melt(id_vars="step", var_name="term", value_name="value").dropna(subset=["value"])
        for column in keep:
            long[column] = result[column]
        frames.append(long)
    if not frames:
        raise AnalysisError(f"no {METRICS_FILE} next to the result rows of {', '.join(map(str, paths))}")
    curves = pd.concat(frames, ignore_index=True)
    return curves[[*keep, *long_columns]]
