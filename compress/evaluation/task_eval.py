"""``clip-compress eval MODEL|RUN_DIR --tasks LIST --data-root ROOT``: a model judged on a task list
(DataComp's ``tasklist.yml`` format), its results written as the field writes them.

Order: the task list is read and every task's data looked up first (all missing sets named in one
error), then the output folder is checked, then the model is loaded and evaluated on every task in
one pass (:func:`~compress.evaluation.evaluate.evaluate_model`: the same zero-shot and retrieval code
as a run's own evaluation), then the output folder receives:

- ``eval_results.jsonl``: DataComp's file (fractions, ``main_metric``);
- ``clip_benchmark/<dataset>_<pretrained>_<model>_en_<task>.json``: clip_benchmark's per-task files;
- ``summary.json``: the model and the SHA-256 of its weights (``model_sha256``,
  :func:`compress.rundir.model_sha256`), the task list (path and SHA-256), the data root, each task's
  main metric, the tasks skipped (DataComp's tasks this evaluator cannot score, with why), and the
  mean over the tasks scored, said as such (``mean_main_metric_scored``, ``tasks_scored``,
  ``tasks_in_list``: a mean over 33 of DataComp's 40 tasks is not DataComp's average), and the
  project's own metrics (``zs/<key>/top1`` ..., percent, the keys of ``result.json``; ``/`` in a key
  written ``-``; retrieval by the project's rule, identical captions counting).

A run directory writes to ``RUN_DIR/eval/<task list name>/`` unless ``--output-dir`` says otherwise,
beside the run's own ``result.json`` (which it leaves alone); ``--force`` on the run removes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from compress.data.robust import DataError
from compress.data.transforms import eval_transform_for
from compress.evaluation.evaluate import evaluate_model
from compress.evaluation.standalone import EvalError, is_run_dir, looks_like_path, run_setup
from compress.evaluation.task_sets import BuiltSet, TaskSource, build_task_set, resolve_sources
from compress.fileio import atomic_write_text, check_output
from compress.models import load_model
from compress.models.forward import tokenizer_for
from compress.precision import resolve_device, resolve_precision
from compress.result_files import (
    SUMMARY_FILE,
    TaskResult,
    datacomp_record,
    field_metrics,
    scored_mean,
    write_result_files,
)
from compress.rundir import RunDir, model_sha256
from compress.tasklist import TaskListError, read_task_list

log = logging.getLogger(__name__)
#: the most DataLoader workers ``eval --tasks`` starts by default (fewer on a machine with fewer cores)
DEFAULT_WORKERS = 4


def default_workers() -> int:
    """``min(4, cpu count)``: image decoding is the cost of a task-list evaluation."""
    return min(DEFAULT_WORKERS, os.cpu_count() or 1)


def evaluate_sets(
    model: nn.Module, built: list[BuiltSet], device: Any, precision: str = "fp32", *, params: bool = True,
    macs: bool = True, throughput: bool = False, progress: bool = False,
) -> tuple[list[TaskResult], dict[str, float]]:
    """Evaluate ``model`` on built task sets: each task's :class:`TaskResult` and the project's flat metrics."""
    metrics = evaluate_model(
        model.to(device), tokenizer_for(model),
        zero_shot_tasks=[b.zero_shot for b in built if b.zero_shot is not None],
        retrieval_sets=[b.retrieval for b in built if b.retrieval is not None],
        device=device, precision=precision, measure_params=params, measure_macs=macs,
        measure_throughput=throughput, progress=progress,
    )
    results = []
    for b in built:
        prefix = f"{'zs' if b.zero_shot is not None else 'ret'}/{b.source.set_name}/"
        own = {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}
        project = {k: v for k, v in own.items() if not k.startswith("row/")}
        results.append(TaskResult(b.source.task, field_metrics(b.source.task.kind, own), project,
                                  b.templates_sha256, b.classnames_sha256, b.num_samples))
    # the project's keys follow the project's rule; clip_benchmark's row-rule recalls are in the field files
    return results, {k: v for k, v in metrics.items() if "/row/" not in k}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _setup(model: str, tasks_file: Path, output_dir: str | None) -> tuple[str | Path, str, Path, str]:
    """(model to load, precision, output folder, model label) of a run directory or a model."""
    path = Path(model).expanduser()
    if is_run_dir(path):
        model_path, _, _, precision = run_setup(path)
        out = Path(output_dir) if output_dir else RunDir(path).eval_dir / tasks_file.stem
        return model_path, precision, out, path.name
    if looks_like_path(model) and not path.exists():
        raise EvalError(f"no such file or folder: {model}")
    if not output_dir:
        raise EvalError("--tasks with a model (not a run directory) needs --output-dir DIR for the result files")
    return (path if path.exists() else model), "auto", Path(output_dir), path.name if path.exists() else model


def evaluate_tasks(
    model: str,
    tasks: str,
    data_root: str | None = None,
    output_dir: str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    throughput: bool = False,
    output: str | None = None,
    progress: bool = True,
    num_workers: int | None = None,
) -> dict[str, Any]:
    """Evaluate a model (a name, checkpoint, export, or a run directory's model) on the task list
    ``tasks`` with data under ``data_root``, write the result files (module docstring) and return the
    summary. ``output``: also the project's flat metrics as JSON there (as plain ``eval --output``).
    ``num_workers``: DataLoader workers (default :func:`default_workers`); ``throughput`` off by default."""
    if batch_size is not None and batch_size < 1:
        raise EvalError(f"--batch-size must be at least 1, got {batch_size}")
    num_workers = default_workers() if num_workers is None else num_workers
    if num_workers < 0:
        raise EvalError(f"--workers must be at least 0, got {num_workers}")
    try:
        task_list = read_task_list(tasks)
        sources: list[TaskSource] = resolve_sources(task_list.tasks, data_root)
    except TaskListError as error:
        raise EvalError(str(error)) from None
    if task_list.skipped_line():
        log.warning("%s: %s", tasks, task_list.skipped_line())
    model_ref, precision, out_dir, label = _setup(model, Path(tasks), output_dir)
    check_output(out_dir, "--output-dir", folder=True)
    if output:
        check_output(output, "--output")
    try:
        dev = resolve_device(device)
        policy = resolve_precision(precision, dev)
    except (RuntimeError, ValueError) as error:
        raise EvalError(f"--device {device}: {error}") from None
    weights_sha256 = model_sha256(model_ref) if isinstance(model_ref, Path) else None
    loaded = load_model(str(model_ref))
    transform, tokenizer = eval_transform_for(loaded), tokenizer_for(loaded)
    try:
        built = [build_task_set(s, transform, tokenizer, batch_size or 128, num_workers) for s in sources]
        for b in built:  # clip_benchmark's numbers for its files, from the same top-k lists
            if b.retrieval is not None:
                b.retrieval.row_rule = True
        results, metrics = evaluate_sets(loaded, built, dev, policy.name, throughput=throughput, progress=progress)
    except DataError as error:
        raise EvalError(str(error)) from None
    write_result_files(out_dir, results, label)
    summary = {
        "model": label, "model_path": str(model_ref), "model_sha256": weights_sha256, "pretrained": "",
        "output_dir": str(out_dir), "task_list": str(Path(tasks).resolve()), "task_list_sha256": _sha256(Path(tasks)),
        "data_root": str(Path(data_root).resolve()) if data_root else None,
        "tasks": [r.task.key for r in results],
        "tasks_skipped": task_list.skipped,
        "main_metrics": {r.task.key: datacomp_record(r)["metrics"]["main_metric"] for r in results},
        **scored_mean(results, task_list.total),
        "metrics": metrics,
    }
    atomic_write_text(out_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
    if output:
        atomic_write_text(Path(output), json.dumps(metrics, indent=2))
    return summary
