"""Evaluation outside a run (``clip-compress eval``): any model on a chosen data set, or a
finished run directory on its own evaluation config, so the numbers equal its ``result.json``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from compress.config import DataConfig, DatasetConfig, EvalConfig, ZeroShotTaskConfig
from compress.data.csv_data import MissingColumns, read_pairs
from compress.data.robust import DataError
from compress.evaluation.run_eval import evaluate_with
from compress.fileio import atomic_write_text, check_output
from compress.models import load_model
from compress.precision import resolve_device, resolve_precision
from compress.recipe import load_config, resolve_stages
from compress.rundir import RunDir, RunModelError, final_model

#: file suffixes of model files ``load_model`` reads (an argument ending so is a path, not a name)
MODEL_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".json")


class EvalError(ValueError):
    """A request ``clip-compress eval`` cannot serve (printed as one line)."""


def is_run_dir(path: Path) -> bool:
    """A run directory holds the resolved ``config.yaml`` (and, once finished, ``model/``)."""
    return path.is_dir() and RunDir(path).config.is_file()


def looks_like_path(name: str) -> bool:
    """Whether a model argument is meant as a file or folder rather than an open_clip name."""
    if name.startswith("hf-hub:") or "@" in name:
        return False
    return "/" in name or os.sep in name or name.startswith((".", "~")) or Path(name).suffix in MODEL_SUFFIXES


#: the options of ``clip-compress eval`` that name a CSV's columns and separator: the keys of ``DatasetConfig``
CSV_OPTIONS = {"image_key": "--image-key", "caption_key": "--caption-key", "separator": "--separator"}


def eval_config_for_data(
    data: str, kind: str | None = None, csv: dict[str, str] | None = None
) -> tuple[EvalConfig, DataConfig | None]:
    """(EvalConfig, DataConfig) for ``--data``: ``synthetic``, an image folder (ImageNet layout;
    the ImageNet preset when it has 1000 classes) or a CSV / TSV of image-text pairs, read with
    ``csv`` (``image_key``, ``caption_key``, ``separator``: as in a config's ``data.val``; the
    separator defaults to a tab for ``.tsv``). ``csv`` given for another kind is refused."""
    path = Path(data)
    kind = kind or ("synthetic" if data == "synthetic" else "csv" if path.suffix in (".csv", ".tsv") else "folder")
    csv = {k: v for k, v in (csv or {}).items() if v is not None}
    if csv and kind != "csv":
        given = ", ".join(CSV_OPTIONS[k] for k in csv)
        raise EvalError(f"{given}: only for a CSV / TSV of image-text pairs (--kind csv), not for --kind {kind}")
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
        csv.setdefault("separator", "\t" if path.suffix == ".tsv" else ",")
        pairs = DatasetConfig(kind="csv", path=data, **csv)
        return EvalConfig(zero_shot=[]), DataConfig(train=pairs, val=pairs)
    if not path.is_dir():
        raise EvalError(f"--data {data}: --kind folder needs a folder with one sub-folder per class, got a file")
    n_classes = sum(1 for p in path.iterdir() if p.is_dir())
    if n_classes == 0:
        raise EvalError(f"--data {data}: no class sub-folders (ImageNet layout: one sub-folder per class)")
    task = "imagenet" if n_classes == 1000 else None
    zero_shot = [ZeroShotTaskConfig(name=path.name, kind="folder", path=data, task=task)]
    return EvalConfig(zero_shot=zero_shot, retrieval=False), None


def run_model(run_dir: Path) -> Path:
    """A finished run's final model (:func:`compress.rundir.final_model`), refusals as :class:`EvalError`."""
    try:
        return final_model(run_dir)
    except RunModelError as error:
        raise EvalError(str(error)) from None


def run_setup(run_dir: Path) -> tuple[Path, EvalConfig, DataConfig | None, str]:
    """The exported model (:func:`run_model`), evaluation config, data config and precision of a finished
    run. A staged run's model is its last stage's, evaluated with that stage's config."""
    model = run_model(run_dir)
    cfg = load_config(RunDir(run_dir).config)
    stages = resolve_stages(cfg)
    if stages:
        cfg = stages[-1].cfg
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
    csv: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Load a model (a name, checkpoint, export, or a run directory's ``model/``), evaluate it
    and optionally write the metrics as JSON.

    A run directory is evaluated with its own ``eval`` / ``data`` config, batch size and
    precision unless ``data`` / ``batch_size`` say otherwise; anything else on ``data``
    (``synthetic`` by default) with a batch size of 128 and ``auto`` precision. ``csv`` names
    the columns and separator of a CSV ``data`` (:func:`eval_config_for_data`)."""
    if batch_size is not None and batch_size < 1:
        raise EvalError(f"--batch-size must be at least 1, got {batch_size}")
    if kind not in (None, "synthetic") and data is None:
        raise EvalError(f"--kind {kind} needs --data PATH")
    if data is None and any(v is not None for v in (csv or {}).values()):
        raise EvalError(f"{', '.join(CSV_OPTIONS[k] for k, v in csv.items() if v is not None)}: name the columns "
                        "of a CSV given with --data")
    if output:
        check_output(output, "--output")
    try:
        dev = resolve_device(device)
    except (RuntimeError, ValueError) as error:
        raise EvalError(f"--device {device}: {error}") from None
    path = Path(model).expanduser()
    if is_run_dir(path):
        model_path, eval_cfg, data_cfg, precision = run_setup(path)
        if data is not None:
            eval_cfg, data_cfg = eval_config_for_data(data, kind, csv)
    else:
        if looks_like_path(model) and not path.exists():
            raise EvalError(f"no such file or folder: {model}")
        model_path, precision = path if path.exists() else model, "auto"
        eval_cfg, data_cfg = eval_config_for_data(data or "synthetic", kind, csv)
    if batch_size is not None:
        eval_cfg.batch_size = batch_size
    eval_cfg.throughput = eval_cfg.throughput and throughput
    try:
        policy = resolve_precision(precision, dev)
    except ValueError as error:
        raise EvalError(f"--device {device}: {error}") from None
    val = data_cfg.val if data_cfg is not None else None
    try:
        if val is not None and val.kind == "csv":  # its header first: a wrong column name costs no model load
            read_pairs(val.path, val.image_key, val.caption_key, val.separator, nrows=0)
        loaded = load_model(str(model_path))
        metrics = evaluate_with(loaded, eval_cfg, data_cfg, dev, policy.name, progress)
    except MissingColumns as error:
        if data is None:  # a run directory's own CSV: its config names the columns
            raise EvalError(str(error)) from None
        raise EvalError(
            f"--data {data}: no column {' or '.join(map(repr, error.missing))}; its columns are "
            f"{', '.join(map(repr, error.columns))}: name them with --image-key and --caption-key (and --separator "
            "if the file is not comma-separated)"
        ) from None
    except DataError as error:
        raise EvalError(str(error)) from None
    if output:
        atomic_write_text(Path(output), json.dumps(metrics, indent=2))
    return metrics
