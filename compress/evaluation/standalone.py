"""Evaluation outside a run (``clip-compress eval``): any model on a chosen data set, or a
finished run directory on its own evaluation config, so the numbers equal its ``result.json``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from compress.config import DataConfig, DatasetConfig, EvalConfig, ZeroShotTaskConfig, load_config
from compress.config.stages import resolve_stages
from compress.evaluation.run_eval import evaluate_with
from compress.fileio import atomic_write_text
from compress.models import load_model
from compress.precision import resolve_device, resolve_precision
from compress.rundir import stage_dir

#: file suffixes of model files ``load_model`` reads (an argument ending so is a path, not a name)
MODEL_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".json")


class EvalError(ValueError):
    """A request ``clip-compress eval`` cannot serve (printed as one line)."""


def is_run_dir(path: Path) -> bool:
    """A run directory holds the resolved ``config.yaml`` (and, once finished, ``model/``)."""
    return path.is_dir() and (path / "config.yaml").is_file()


def looks_like_path(name: str) -> bool:
    """Whether a model argument is meant as a file or folder rather than an open_clip name."""
    if name.startswith("hf-hub:") or "@" in name:
        return False
    return "/" in name or os.sep in name or name.startswith((".", "~")) or Path(name).suffix in MODEL_SUFFIXES


def eval_config_for_data(data: str, kind: str | None = None) -> tuple[EvalConfig, DataConfig | None]:
    """(EvalConfig, DataConfig) for ``--data``: ``synthetic``, an image folder (ImageNet layout;
    the ImageNet preset when it has 1000 classes) or a CSV / TSV of image-text pairs."""
    path = Path(data)
    kind = kind or ("synthetic" if data == "synthetic" else "csv" if path.suffix in (".csv", ".tsv") else "folder")
    if kind == "synthetic":
        if data != "synthetic":
            raise EvalError(f"--kind synthetic takes no data path, got --data {data}")
        tasks = [ZeroShotTaskConfig(name=t, kind="synthetic", task=t) for t in ("color_shape", "shape", "color")]
        return EvalConfig(zero_shot=tasks), DataConfig()
    if not path.exists():
        raise EvalError(f"--data: no such file or folder: {data}")
    if kind == "csv":
        if not path.is_file():
            raise EvalError(f"--data {data}: --kind csv needs a CSV / TSV file of image-text pairs, got a folder")
        sep = "\t" if path.suffix == ".tsv" else ","
        pairs = DatasetConfig(kind="csv", path=data, separator=sep)
        return EvalConfig(zero_shot=[]), DataConfig(train=pairs, val=pairs)
    if not path.is_dir():
        raise EvalError(f"--data {data}: --kind folder needs a folder with one sub-folder per class, got a file")
    n_classes = sum(1 for p in path.iterdir() if p.is_dir())
    if n_classes == 0:
        raise EvalError(f"--data {data}: no class sub-folders (ImageNet layout: one sub-folder per class)")
    task = "imagenet" if n_classes == 1000 else None
    zero_shot = [ZeroShotTaskConfig(name=path.name, kind="folder", path=data, task=task)]
    return EvalConfig(zero_shot=zero_shot, retrieval=False), None


def _run_setup(run_dir: Path) -> tuple[Path, EvalConfig, DataConfig | None, str]:
    """The exported model, evaluation config, data config and precision of a finished run. A staged
    run's model is its last stage's (``stages/<k>-<name>/model``), evaluated with that stage's config."""
    cfg = load_config(run_dir / "config.yaml")
    stages = resolve_stages(cfg)
    if stages:
        cfg = stages[-1].cfg
    folder = stage_dir(run_dir, stages[-1].dir_name if stages else None)
    model = folder / "model"
    if not model.exists():
        status = ""
        if (run_dir / "result.json").is_file():
            status = f" (status: {json.loads((run_dir / 'result.json').read_text()).get('status')})"
        raise EvalError(f"{run_dir}: the run has no exported model ({model.relative_to(run_dir)}/); it did not "
                        f"finish{status}")
    return model, cfg.eval, cfg.data, cfg.train.precision


def evaluate_only(
    model: str,
    data: str | None = None,
    kind: str | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    throughput: bool = True,
    output: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Load a model (a name, checkpoint, export, or a run directory's ``model/``), evaluate it
    and optionally write the metrics as JSON.

    A run directory is evaluated with its own ``eval`` / ``data`` config, batch size and
    precision unless ``data`` / ``batch_size`` say otherwise; anything else on ``data``
    (``synthetic`` by default) with a batch size of 128 and ``auto`` precision."""
    if batch_size is not None and batch_size < 1:
        raise EvalError(f"--batch-size must be at least 1, got {batch_size}")
    if kind not in (None, "synthetic") and data is None:
        raise EvalError(f"--kind {kind} needs --data PATH")
    try:
        dev = resolve_device(device)
    except (RuntimeError, ValueError) as error:
        raise EvalError(f"--device {device}: {error}") from None
    path = Path(model).expanduser()
    if is_run_dir(path):
        model_path, eval_cfg, data_cfg, precision = _run_setup(path)
        if data is not None:
            eval_cfg, data_cfg = eval_config_for_data(data, kind)
    else:
        if looks_like_path(model) and not path.exists():
            raise EvalError(f"no such file or folder: {model}")
        model_path, precision = path if path.exists() else model, "auto"
        eval_cfg, data_cfg = eval_config_for_data(data or "synthetic", kind)
    if batch_size is not None:
        eval_cfg.batch_size = batch_size
    eval_cfg.throughput = eval_cfg.throughput and throughput
    try:
        policy = resolve_precision(precision, dev)
    except ValueError as error:
        raise EvalError(f"--device {device}: {error}") from None
    metrics = evaluate_with(load_model(str(model_path)), eval_cfg, data_cfg, dev, policy.name, progress)
    if output:
        atomic_write_text(Path(output), json.dumps(metrics, indent=2))
    return metrics
