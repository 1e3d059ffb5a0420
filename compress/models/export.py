"""Write and read compressed models.

A uniformly shaped model (every layer the same head count and MLP width, attention inner
size equal to the width) is written in open_clip's own layout, a folder holding
``open_clip_config.json`` and ``open_clip_model.safetensors``, so that
``open_clip.create_model('local-dir:FOLDER')`` loads it without this project.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.fileio import atomic_write_text
from compress.models.build import (
    OPEN_CLIP_CONFIG_FILE,
    OPEN_CLIP_WEIGHTS_FILE,
    ModelLoadError,
    _finish,
    build_from_config,
    check_fits,
    checkpoint_metadata,
    load_weights,
    preprocess_config,
    save_safetensors,
    set_preprocess,
)
from compress.models.nonuniform import is_nonuniform_folder, load_nonuniform, save_nonuniform


def check_uniform(model: nn.Module, cfg: dict[str, Any]) -> None:
    """Refuse a model that open_clip could not rebuild from ``cfg`` alone.

    Every tensor must have the shape a fresh model of ``cfg`` has (same heads, inner size and
    MLP width in every layer), and no learnable masks may be attached."""
    # not at the top: ``compress.models`` (whose package imports this module) is imported by compress.masks
    from compress.masks.attach import get_masks

    if get_masks(model) is not None:
        raise ModelLoadError(
            "the model carries learnable masks; prune them (compress.masks.prune_masked) before exporting"
        )
    with torch.device("meta"):
        reference = build_from_config(cfg, convert=False)
    try:
        check_fits(reference, model.state_dict(), "open_clip export")
    except ModelLoadError as e:
        raise ModelLoadError(
            f"the model is not uniformly shaped like its clip_cfg, so open_clip cannot load it ({e})"
        ) from None


def save_open_clip(model: nn.Module, folder: str | Path) -> Path:
    """Write a uniform model as an open_clip ``local-dir:`` folder; returns the folder.

    ``open_clip.create_model('local-dir:' + folder)`` and ``load_model(folder)`` both load it."""
    folder = Path(folder)
    cfg = getattr(model, "clip_cfg", None)
    if cfg is None:
        raise ModelLoadError("the model has no clip_cfg: create it with compress.models.load_model")
    check_uniform(model, cfg)
    save_safetensors(model.state_dict(), folder / OPEN_CLIP_WEIGHTS_FILE, checkpoint_metadata(model))
    config = {"model_cfg": cfg, "preprocess_cfg": preprocess_config(model)}
    atomic_write_text(folder / OPEN_CLIP_CONFIG_FILE, json.dumps(config, indent=2))
    return folder


def load_exported(folder: Path, convert: bool = True) -> nn.Module:
    """Load a folder written by :func:`save_open_clip` (or any open_clip ``local-dir`` folder
    holding ``open_clip_config.json`` and ``open_clip_model.safetensors``), or a non-uniform
    folder written by :func:`compress.models.nonuniform.save_nonuniform`."""
    if is_nonuniform_folder(folder):
        return load_nonuniform(folder)
    config_file = folder / OPEN_CLIP_CONFIG_FILE
    if not config_file.is_file():
        raise ModelLoadError(f"{folder}: no {OPEN_CLIP_CONFIG_FILE} (not a model exported by clip-compress)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{config_file}: not valid JSON: {e}") from None
    cfg = config.get("model_cfg", config)
    model = build_from_config(cfg, convert=False)
    load_weights(model, folder / OPEN_CLIP_WEIGHTS_FILE)
    # as open_clip does: the file's preprocess config, its size taken from the built model
    set_preprocess(model, config.get("preprocess_cfg"))
    return _finish(model, cfg, name=folder.name, convert=convert)


def save_model(model: nn.Module, folder: str | Path, report_dir: Path | None = None) -> Path:
    """Write a trained student: open_clip's layout when it is uniformly shaped, else this
    project's non-uniform format (config JSON + safetensors, see ``compress.models.structure``)."""
    try:
        check_uniform(model, model.clip_cfg)
    except ModelLoadError:
        return save_nonuniform(model, folder, report_dir=report_dir)
    return save_open_clip(model, folder)
