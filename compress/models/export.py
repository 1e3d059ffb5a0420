"""Write and read compressed models.

A uniformly shaped model (every layer the same head count and MLP width, attention inner
size equal to the width) is written in open_clip's own layout, a folder holding
``open_clip_config.json`` and ``open_clip_model.safetensors``, so that
``open_clip.create_model('local-dir:FOLDER')`` loads it without this project.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from compress.models.factory import (
    METADATA_CONFIG_KEY,
    OPEN_CLIP_CONFIG_FILE,
    OPEN_CLIP_WEIGHTS_FILE,
    ModelLoadError,
    _finish,
    _load_checkpoint_into,
    build_from_config,
    read_config_file,
)


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder, then rename (never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Atomically write a state dict (shared storage cloned, tensors made contiguous)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def preprocess_config(model: nn.Module) -> dict[str, Any]:
    visual = getattr(model, "visual", None)
    size = getattr(visual, "image_size", 224)
    return {
        "size": list(size) if isinstance(size, tuple | list) else size,
        "mean": list(getattr(visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)),
        "std": list(getattr(visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }


def save_open_clip(model: nn.Module, folder: str | Path) -> Path:
    """Write a uniform model as an open_clip ``local-dir:`` folder; returns the folder."""
    folder = Path(folder)
    cfg = getattr(model, "clip_cfg", None)
    if cfg is None:
        raise ModelLoadError("the model has no clip_cfg: create it with compress.models.load_model")
    save_safetensors(
        model.state_dict(), folder / OPEN_CLIP_WEIGHTS_FILE, {METADATA_CONFIG_KEY: json.dumps(cfg)}
    )
    config = {"model_cfg": cfg, "preprocess_cfg": preprocess_config(model)}
    atomic_write_text(folder / OPEN_CLIP_CONFIG_FILE, json.dumps(config, indent=2))
    return folder


def load_exported(folder: Path, convert: bool = True) -> nn.Module:
    """Load a folder written by :func:`save_open_clip`."""
    config_file = folder / OPEN_CLIP_CONFIG_FILE
    if not config_file.is_file():
        raise ModelLoadError(f"{folder}: no {OPEN_CLIP_CONFIG_FILE} (not a model exported by clip-compress)")
    cfg = read_config_file(config_file)
    model = build_from_config(cfg, convert=False)
    _load_checkpoint_into(model, folder / OPEN_CLIP_WEIGHTS_FILE)
    return _finish(model, cfg, name=folder.name, convert=convert)
