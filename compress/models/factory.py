"""Create teachers and students: open_clip names, ``name@tag``, checkpoints, config files.

Every model this factory returns carries ``model.clip_cfg`` (its open_clip model config,
``quick_gelu`` included) and ``model.clip_name``, and has its attention converted to
:class:`~compress.models.attention.HeadAttention` unless ``convert=False``.

Resolution of a :class:`~compress.config.ModelSpec` ``model`` string:

- ``ViT-B-32@laion2b_s34b_b79k``: open_clip's own loading (downloads where a network exists);
- ``ViT-B-32`` (+ ``pretrained: tag-or-file``): an open_clip or shipped config, random or loaded;
- ``path/to/config.json``: an open_clip model config (``{embed_dim, vision_cfg, text_cfg}``)
  or an open_clip ``open_clip_config.json`` (``{model_cfg, preprocess_cfg}``);
- ``path/to/dir`` (or ``local-dir:path/to/dir``): a model exported by this project;
- ``path/to/weights.safetensors`` / ``.pt``: a checkpoint that carries its config in its
  metadata (written by this project), or is given one with ``pretrained``.

Checkpoints are read without unpickling arbitrary objects and must fit the config exactly (no
silent resizing of position embeddings): :mod:`compress.models.build`, which this module, the
structure code and the export formats build on.
"""

from __future__ import annotations

import copy
import difflib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from torch import nn

from compress.models.build import OPEN_CLIP_CONFIG_FILE as OPEN_CLIP_CONFIG_FILE  # re-exported
from compress.models.build import (
    ModelLoadError,
    _finish,
    build_from_config,
    check_activation,
    checkpoint_config,
    load_weights,
    set_preprocess,
)
from compress.models.export import load_exported
from compress.models.forward import tokenizer_for

CONFIG_DIR = Path(__file__).parent / "configs"
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
LOCAL_DIR_PREFIX = "local-dir:"

_registered = False


def register_shipped_configs() -> None:
    """Make the configs in ``compress/models/configs`` known to open_clip by name."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def list_shipped_configs() -> list[str]:
    """Names of the model configs shipped with this project (TinyCLIP zoo and test models)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def get_model_config(name: str) -> dict[str, Any]:
    """The open_clip model config of a built-in or shipped model name (a deep copy)."""
    register_shipped_configs()
    name = name.replace("/", "-")
    cfg = open_clip.get_model_config(name) if ":" not in name else None
    if cfg is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ModelLoadError(f"unknown model config {name!r}.{hint} See `open_clip.list_models()`.")
    cfg = copy.deepcopy(cfg)
    if name.endswith("-quickgelu"):
        cfg["quick_gelu"] = True
    return cfg


def read_config_file(path: Path) -> dict[str, Any]:
    """An open_clip model config, or the ``model_cfg`` of an ``open_clip_config.json``."""
    return _read_config_and_preprocess(path)[0]


def _read_config_and_preprocess(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model config and the ``preprocess_cfg`` (empty if none) of a config JSON."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: not valid JSON: {e}") from None
    preprocess: dict[str, Any] = {}
    if isinstance(data, dict) and "model_cfg" in data:
        preprocess = dict(data.get("preprocess_cfg") or {})
        data = data["model_cfg"]
    if not isinstance(data, dict) or "vision_cfg" not in data or "text_cfg" not in data:
        raise ModelLoadError(f"{path}: not an open_clip model config (needs vision_cfg and text_cfg)")
    return data, preprocess


def resolve_spec(model: str, pretrained: str | None = None) -> tuple[str, str, str | None]:
    """How a model string is read: ``(kind, spec, pretrained)``, ``kind`` one of ``exported``
    (a folder written by this project), ``file`` (a config JSON or a checkpoint) or ``named``
    (an architecture name); ``name@tag`` is split into the name and ``pretrained``."""
    spec = model.removeprefix(LOCAL_DIR_PREFIX)
    if "@" in spec and not Path(spec).exists():
        if pretrained is not None:
            raise ModelLoadError(f"{spec!r} names a pretrained tag already; do not also set pretrained")
        spec, pretrained = spec.split("@", 1)
    path = Path(spec)
    if path.is_dir():
        return "exported", spec, pretrained
    if path.suffix == ".json" or path.suffix in CHECKPOINT_SUFFIXES or model.startswith(LOCAL_DIR_PREFIX):
        return "file", spec, pretrained
    return "named", spec, pretrained


def has_weights(model: str, pretrained: str | None = None) -> bool:
    """Whether :func:`load_model` would load weights (a tag, a checkpoint, an exported folder,
    ``pretrained``) rather than build the architecture with random weights (a bare name or a
    config JSON without ``pretrained``)."""
    kind, spec, pretrained = resolve_spec(model, pretrained)
    return kind == "exported" or bool(pretrained) or (kind == "file" and Path(spec).suffix != ".json")


def load_model(
    model: str,
    pretrained: str | None = None,
    force_quick_gelu: bool = False,
    device: str | torch.device = "cpu",
    convert: bool = True,
) -> nn.Module:
    """Resolve a model string (see the module docstring) into a module in eval mode.

    Args:
        model: ``name``, ``name@tag``, a config JSON, a checkpoint file or an exported folder.
        pretrained: an open_clip tag or a checkpoint file for a named architecture / config JSON.
        force_quick_gelu: build with QuickGELU (weights trained with GELU are then refused).
        device: where to put the model.
        convert: replace ``nn.MultiheadAttention`` by :class:`HeadAttention` (exact).

    Raises:
        ModelLoadError: unknown name or tag, missing or unreadable file, a checkpoint holding
            pickled objects, weights that do not fit the config, or an activation mismatch.
    """
    kind, spec, pretrained = resolve_spec(model, pretrained)
    path = Path(spec)
    if kind == "exported":
        if pretrained:
            raise ModelLoadError(f"{path}: an exported folder holds its weights and config; drop pretrained")
        result = load_exported(path, convert=convert)
        if force_quick_gelu:
            check_activation({"quick_gelu": True}, result.clip_cfg, str(path))
    elif kind == "file":
        result = _load_from_file(path, pretrained, force_quick_gelu, convert)
    else:
        result = _load_named(spec, pretrained, force_quick_gelu, convert)
    result.to(device)
    result.eval()
    return result


def _load_from_file(path: Path, pretrained: str | None, force_quick_gelu: bool, convert: bool) -> nn.Module:
    """A model config JSON (random, or ``pretrained`` weights) or a self-describing checkpoint."""
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    preprocess: dict[str, Any] = {}
    if path.suffix == ".json":
        cfg, preprocess = _read_config_and_preprocess(path)
        weights = Path(pretrained) if pretrained else None
    else:
        if pretrained:
            raise ModelLoadError(f"{path} is a checkpoint already; do not also set pretrained")
        cfg = checkpoint_config(path)
        if cfg is None:
            raise ModelLoadError(
                f"{path}: the checkpoint carries no model config; name the architecture and pass "
                f"the file as pretrained (model: ViT-B-32, pretrained: {path})"
            )
        weights = path
    model = _build_and_load(cfg, weights, force_quick_gelu, path.stem, convert)
    if preprocess:  # an open_clip_config.json's own mean/std/resize mode (SigLIP, timm towers...)
        set_preprocess(model, preprocess)
    return model


def _load_named(name: str, pretrained: str | None, force_quick_gelu: bool, convert: bool) -> nn.Module:
    """An open_clip / shipped config name, random, with a pretrained tag, or with a checkpoint file."""
    name = name.replace("/", "-")
    cfg = get_model_config(name)
    if pretrained and not _looks_like_path(pretrained):
        if force_quick_gelu:
            cfg["quick_gelu"] = True
        return _finish(_load_open_clip_tag(name, pretrained, cfg), cfg, name=name, convert=convert)
    return _build_and_load(cfg, Path(pretrained) if pretrained else None, force_quick_gelu, name, convert)


def _looks_like_path(pretrained: str) -> bool:
    """A ``pretrained`` value is a file (rather than an open_clip tag) when it exists or looks like one."""
    p = Path(pretrained)
    return p.exists() or p.suffix in CHECKPOINT_SUFFIXES or "/" in pretrained or "\\" in pretrained


def _build_and_load(
    cfg: dict[str, Any], weights: Path | None, force_quick_gelu: bool, name: str | None, convert: bool
) -> nn.Module:
    if force_quick_gelu:
        cfg["quick_gelu"] = True
    model = build_from_config(cfg, convert=False)
    if weights is not None:
        load_weights(model, weights)
    return _finish(model, cfg, name=name, convert=convert)


def check_pretrained_tag(name: str, tag: str, cfg: Mapping[str, Any]) -> None:
    """Refuse an unknown open_clip tag, or one trained with the other activation than ``cfg``
    (open_clip's own tables: nothing is downloaded)."""
    register_shipped_configs()
    tag_cfg = open_clip.get_pretrained_cfg(name, tag)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ModelLoadError(
            f"{tag!r} is neither a pretrained tag of {name!r} nor a file. "
            f"Known tags: {', '.join(tags) or '(none)'}"
        )
    check_activation(cfg, tag_cfg, f"{name}@{tag}")


def _load_open_clip_tag(name: str, tag: str, cfg: dict[str, Any]) -> nn.Module:
    """``open_clip.create_model(name, pretrained=tag)``, refusing an activation mismatch first."""
    check_pretrained_tag(name, tag, cfg)
    try:
        return open_clip.create_model(name, pretrained=tag, force_quick_gelu=bool(cfg.get("quick_gelu")))
    except RuntimeError as e:
        raise ModelLoadError(f"{name}@{tag}: open_clip could not load the weights: {e}") from e


def load_with_transforms(folder: str | Path, device: str = "cpu") -> tuple[nn.Module, Callable, Callable]:
    """``(model, preprocess, tokenizer)`` of a model :func:`load_model` reads (an exported folder, uniform or
    not), like ``open_clip.create_model_and_transforms`` (eval transform)."""
    model = load_model(str(folder), device=device)
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    return model, preprocess, tokenizer_for(model)
