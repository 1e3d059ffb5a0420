"""The field's result files, written from a task-list evaluation and read back. No torch import.

- clip_benchmark's per-task JSON (LAION CLIP_benchmark 1.6.2, ``cli.py``): one file per task named
  as its default ``--output`` template ``{dataset}_{pretrained}_{model}_{language}_{task}.json``,
  holding ``{"dataset", "model", "pretrained", "task", "metrics", "language"}``; metrics in its names
  and as fractions: ``acc1``, ``acc5`` (NaN under 5 classes, written ``NaN`` as its ``json.dump``
  does), ``mean_per_class_recall``; ``image_retrieval_recall@k`` (text->image) and
  ``text_retrieval_recall@k`` (image->text), by clip_benchmark's own rule (only a text's own image counts,
  :func:`compress.evaluation.retrieval.recall_at_k`'s ``row_rule``), so a file named as clip_benchmark's
  holds its numbers; the project's rule (identical captions count) stays in ``summary.json``. Two fields
  of this project's are added, as clip_benchmark adds ``classnames`` /
  ``templates`` on request: ``templates_sha256`` and ``classnames_sha256``.
- DataComp's ``eval_results.jsonl`` (Gadre et al. 2023, ``evaluate.py``): one line per task,
  ``{"key", "dataset" (the task's display name), "metrics"}``, metrics as fractions plus
  ``main_metric`` (the value of the task's main metric, ``None`` if absent) and, for retrieval,
  ``mean_recall@1``; ``acc5`` is ``null`` under 5 classes (DataComp's ``wds_eval.py`` sets it to
  ``None``); retrieval metrics by clip_benchmark's rule, as DataComp computes them with its
  ``zeroshot_retrieval.evaluate``. This project adds ``templates_sha256`` / ``classnames_sha256`` to each line.

A template hash is the SHA-256 of the templates as ``zeroshot_classification_templates.txt`` holds
them (one per line, ``{c}`` placeholders, each line ending in a newline): ``sha256sum`` of that file
gives the same digest; the class-name hash likewise of ``classnames.txt``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.fileio import atomic_write_text
from compress.tasklist import CLASSIFICATION, RECALL_KS, RETRIEVAL, TaskSpec

#: the folder (under the output folder) of the clip_benchmark JSON files, and DataComp's file
CLIP_BENCHMARK_DIR = "clip_benchmark"
EVAL_RESULTS_FILE = "eval_results.jsonl"
LANGUAGE = "en"
#: the summary written beside the two result files
SUMMARY_FILE = "summary.json"


def lines_sha256(lines: Iterable[str]) -> str:
    """SHA-256 (hex) of ``lines`` written one per line, each ending in a newline."""
    return hashlib.sha256("".join(f"{line}\n" for line in lines).encode("utf-8")).hexdigest()


def template_hash(templates: Sequence[str]) -> str:
    """The hash of zero-shot templates in clip_benchmark's ``{c}`` form (``{}`` is written ``{c}``)."""
    return lines_sha256(t.replace("{}", "{c}") for t in templates)


@dataclass
class TaskResult:
    """One task's outcome: the field's metrics (fractions, clip_benchmark's names), the project's
    metrics (percent, ``top1`` / ``i2t_r1`` ...), the hashes and the number of samples."""

    task: TaskSpec
    metrics: dict[str, float | None]
    project_metrics: dict[str, float]
    templates_sha256: str | None = None
    classnames_sha256: str | None = None
    num_samples: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _fraction(value: float | None) -> float:
    return float("nan") if value is None or math.isnan(value) else value / 100.0


def field_metrics(kind: str, project: Mapping[str, float]) -> dict[str, float]:
    """clip_benchmark's metrics (fractions) from the project's (percent) of one task: ``top1``,
    ``top5``, ``mean_per_class_recall`` for classification; for retrieval clip_benchmark's row-rule
    ``row/i2t_r{k}`` / ``row/t2i_r{k}`` where given, else ``i2t_r{k}`` / ``t2i_r{k}`` (``text_retrieval``
    is image->text, ``image_retrieval`` text->image); plus ``mean_recall@1``."""
    if kind == CLASSIFICATION:
        return {
            "acc1": _fraction(project.get("top1")),
            "acc5": _fraction(project.get("top5")),
            "mean_per_class_recall": _fraction(project.get("mean_per_class_recall")),
        }
    out = {}
    row = "row/" if any(k.startswith("row/") for k in project) else ""
    for k in RECALL_KS:
        out[f"image_retrieval_recall@{k}"] = _fraction(project.get(f"{row}t2i_r{k}"))
        out[f"text_retrieval_recall@{k}"] = _fraction(project.get(f"{row}i2t_r{k}"))
    out["mean_recall@1"] = 0.5 * (out["image_retrieval_recall@1"] + out["text_retrieval_recall@1"])
    return out


def clip_benchmark_dataset(task: TaskSpec) -> str:
    """The ``dataset`` clip_benchmark names the task by: ``wds/<dataset>`` for a webdataset folder."""
    return f"wds/{task.dataset}" if task.format == "wds" else task.dataset


def clip_benchmark_filename(task: TaskSpec, model: str, pretrained: str) -> str:
    """clip_benchmark's default output name ``{dataset}_{pretrained}_{model}_{language}_{task}.json``
    (``/`` in the data set, and here in the model and pretrained, written ``_``)."""
    slug = task.dataset.replace("/", "_")
    return f"{slug}_{pretrained.replace('/', '_')}_{model.replace('/', '_')}_{LANGUAGE}_{task.kind}.json"


def clip_benchmark_record(result: TaskResult, model: str, pretrained: str) -> dict[str, Any]:
    """One task's clip_benchmark JSON (its metrics only: ``mean_recall@1`` is DataComp's)."""
    metrics = {k: v for k, v in result.metrics.items() if k != "mean_recall@1"}
    record: dict[str, Any] = {
        "dataset": clip_benchmark_dataset(result.task), "model": model, "pretrained": pretrained,
        "task": result.task.kind, "metrics": metrics, "language": LANGUAGE,
    }
    if result.task.kind == CLASSIFICATION:
        record["templates_sha256"] = result.templates_sha256
        record["classnames_sha256"] = result.classnames_sha256
    return record


def datacomp_record(result: TaskResult) -> dict[str, Any]:
    """One task's line of DataComp's ``eval_results.jsonl`` (NaN written as null, as DataComp's None)."""
    metrics: dict[str, float | None] = {
        k: None if v is None or (isinstance(v, float) and math.isnan(v)) else v for k, v in result.metrics.items()
    }
    metrics["main_metric"] = metrics.get(result.task.main_metric)
    record: dict[str, Any] = {"key": result.task.key, "dataset": result.task.name, "metrics": metrics}
    if result.task.kind == CLASSIFICATION:
        record["templates_sha256"] = result.templates_sha256
        record["classnames_sha256"] = result.classnames_sha256
    return record


def write_result_files(out_dir: str | Path, results: Sequence[TaskResult], model: str, pretrained: str = ""
                       ) -> dict[str, Any]:
    """Write ``out_dir/clip_benchmark/<one file per task>.json`` and ``out_dir/eval_results.jsonl``
    (replaced as a whole, atomically); returns the paths written."""
    out = Path(out_dir)
    folder = out / CLIP_BENCHMARK_DIR
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for result in results:
        path = folder / clip_benchmark_filename(result.task, model, pretrained)
        atomic_write_text(path, json.dumps(clip_benchmark_record(result, model, pretrained)))
        files.append(path)
    lines = "".join(json.dumps(datacomp_record(r)) + "\n" for r in results)
    atomic_write_text(out / EVAL_RESULTS_FILE, lines)
    return {"clip_benchmark": files, "eval_results": out / EVAL_RESULTS_FILE}


def scored_mean(results: Sequence[TaskResult], tasks_in_list: int) -> dict[str, Any]:
    """The mean of the main metrics over the tasks scored (those with a value), said as what it is:
    ``{"mean_main_metric_scored", "tasks_scored", "tasks_in_list", "mean_over"}``. It is DataComp's
    average only when every task DataComp averages is scored; it is never named so here."""
    values = [v for v in (datacomp_record(r)["metrics"]["main_metric"] for r in results) if v is not None]
    mean = sum(values) / len(values) if values else float("nan")
    return {"mean_main_metric_scored": mean, "tasks_scored": len(values), "tasks_in_list": tasks_in_list,
            "mean_over": f"the main metric's mean over the {len(values)} tasks scored of the {tasks_in_list} "
                         "in the task list"}


__all__ = [
    "CLASSIFICATION", "CLIP_BENCHMARK_DIR", "EVAL_RESULTS_FILE", "LANGUAGE", "RETRIEVAL",
    "SUMMARY_FILE", "TaskResult",
    "clip_benchmark_filename", "clip_benchmark_record", "datacomp_record", "field_metrics", "lines_sha256",
    "scored_mean", "template_hash", "write_result_files",
]
