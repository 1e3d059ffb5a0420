"""Write and read compressed models.

A uniformly shaped model (every layer the same head count and MLP width, attention inner
size equal to the width) is written in open_clip's own layout, a folder holding
``open_clip_config.json`` and ``open_clip_model.safetensors``, so that
``open_clip.create_model('local-dir:FOLDER')`` loads it without this project.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from open_clip.transform import PreprocessCfg
from safetensors.torch import save_file
from torch import nn

from compress.fileio import atomic_write, atomic_write_text
from compress.models.factory import (
    METADATA_CONFIG_KEY,
    OPEN_CLIP_CONFIG_FILE,
    OPEN_CLIP_WEIGHTS_FILE,
    ModelLoadError,
    _finish,
    build_from_config,
    check_fits,
    load_weights,
    set_preprocess,
)


def save_safetensors(
    state: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str] | None = None
) -> None:
    """Atomically write a state dict (shared storage cloned, tensors made contiguous).

    With ``metadata=checkpoint_metadata(model)`` the file describes itself, and
    ``load_model(path)`` needs nothing else."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=dict(metadata) if metadata else None))


def checkpoint_metadata(model: nn.Module) -> dict[str, str]:
    """Safetensors metadata recording ``model.clip_cfg`` (read back by ``load_model``)."""
    cfg = getattr(model, "clip_cfg", None)
    if cfg is None:
        raise ModelLoadError("the model has no clip_cfg: create it with compress.models.load_model")
    return {METADATA_CONFIG_KEY: json.dumps(cfg)}


def preprocess_config(model: nn.Module) -> dict[str, Any]:
    """The model's open_clip preprocess config (``model.visual.preprocess_cfg``), JSON-ready."""
    visual = getattr(model, "visual", model)
    cfg = getattr(visual, "preprocess_cfg", None)
    if cfg is None:
        size = getattr(visual, "image_size", 224)
        cfg = asdict(PreprocessCfg(size=size))
    return json.loads(json.dumps(cfg))  # tuples -> lists


def check_uniform(model: nn.Module, cfg: dict[str, Any]) -> None:
    """Refuse a model that open_clip could not rebuild from ``cfg`` alone.

    Every tensor must have the shape a fresh model of ``cfg`` has (same heads, inner size and
    MLP width in every layer), and no learnable masks may be attached."""
    from compress.masks.attach import get_masks  # compress.masks builds on compress.models

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
    from compress.models.nonuniform import is_nonuniform_folder, load_nonuniform  # (import cycle)

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
        from compress.models.nonuniform import save_nonuniform

        return save_nonuniform(model, folder, report_dir=report_dir)
    return save_open_clip(model, folder)
