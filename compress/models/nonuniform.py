"""Save and load non-uniform models: per-layer head counts and MLP widths, a smaller residual width.

open_clip cannot describe such a model in its config, so it is written as a folder holding

- ``clip_compress_config.json``: ``{"format", "model_cfg" (the open_clip config the structure
  is relative to), "structure" (see :mod:`compress.models.structure`), "preprocess_cfg"}``;
- ``model.safetensors``: the state dict (its metadata names the format).

``compress.models.load_model(folder)`` (through ``load_exported``) or :func:`load_nonuniform`
loads it back as an open_clip ``CLIP`` with ``encode_image`` / ``encode_text``;
``compress.models.load_with_transforms`` also gives the open_clip preprocessing and tokenizer.
(``compress.models.export.save_model`` picks open_clip's own layout when open_clip can build
the model, and this format otherwise.)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from compress.fileio import atomic_write_text
from compress.models.build import (
    ModelLoadError,
    _finish,
    build_from_config,
    check_fits,
    preprocess_config,
    read_state_dict,
    save_safetensors,
    set_preprocess,
)
from compress.models.structure import apply_structure, describe_against, describe_structure
from compress.rundir import NONUNIFORM_CONFIG_FILE, STRUCTURE_FILE

NONUNIFORM_WEIGHTS_FILE = "model.safetensors"
FORMAT = "clip-compress-nonuniform/1"


def save_nonuniform(model: nn.Module, folder: str | Path, report_dir: str | Path | None = None) -> Path:
    """Write ``model`` (with ``clip_cfg``; its structure is read from its modules) to ``folder``;
    with ``report_dir``, also its structure as ``report_dir/structure.json`` (:func:`write_structure`)."""
    folder = Path(folder)
    cfg = getattr(model, "clip_cfg", None)
    if cfg is None:
        raise ModelLoadError("the model has no clip_cfg: create it with compress.models.load_model")
    structure = describe_structure(model)
    save_safetensors(model.state_dict(), folder / NONUNIFORM_WEIGHTS_FILE, {"format": FORMAT})
    config = {"format": FORMAT, "model_cfg": cfg, "structure": structure, "preprocess_cfg": preprocess_config(model)}
    atomic_write_text(folder / NONUNIFORM_CONFIG_FILE, json.dumps(config, indent=2))
    if report_dir is not None:
        write_structure(model, report_dir)
    return folder


def write_structure(
    model: nn.Module, folder: str | Path, source: nn.Module | None = None,
    layer_map: Mapping[str, list[int]] | None = None, title: str | None = None,
) -> Path | None:
    """``folder/structure.json``: the model's structure (for ``analysis.structure_report``), if it has towers:
    relative to ``source``, the model it inherited from (:func:`describe_against`; ``layer_map`` aligns a
    shallower tower), else to its own config; with ``title`` (the run and its sparsity) for the report."""
    structure = describe_against(model, source, layer_map) if source is not None else describe_structure(model)
    if not structure:
        return None
    path = Path(folder) / STRUCTURE_FILE
    data = {"title": title, "structure": structure} if title else structure
    atomic_write_text(path, json.dumps(data, indent=2))
    return path


def is_nonuniform_folder(folder: str | Path) -> bool:
    return (Path(folder) / NONUNIFORM_CONFIG_FILE).is_file()


def read_nonuniform_config(folder: Path) -> dict[str, Any]:
    path = folder / NONUNIFORM_CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: not readable JSON: {e}") from None
    if config.get("format") != FORMAT or "model_cfg" not in config or "structure" not in config:
        raise ModelLoadError(f"{path}: not a {FORMAT} config (needs format, model_cfg and structure)")
    return config


def load_nonuniform(folder: str | Path, device: str = "cpu") -> nn.Module:
    """The model saved by :func:`save_nonuniform`, in eval mode, with ``clip_cfg`` and
    ``clip_structure`` (attention is always converted: non-uniform heads need it)."""
    folder = Path(folder)
    config = read_nonuniform_config(folder)
    cfg, structure = config["model_cfg"], config["structure"]
    model = build_from_config(cfg, convert=True)
    apply_structure(model, structure)
    state = read_state_dict(folder / NONUNIFORM_WEIGHTS_FILE)
    check_fits(model, state, str(folder / NONUNIFORM_WEIGHTS_FILE))
    model.load_state_dict(state, strict=True, assign=True)
    set_preprocess(model, config.get("preprocess_cfg"))
    model = _finish(model, cfg, name=folder.name, convert=True)
    model.clip_structure = structure
    return model.to(device).eval()

