"""Create teachers and students: open_clip names, ``name@tag``, checkpoints, config files.

Every model this factory returns carries ``model.clip_cfg`` (its open_clip model config,
``quick_gelu`` included) and ``model.clip_name``, and has its attention converted to
:class:`~compress.models.attention.HeadAttention` unless ``convert=False``.

Resolution of a :class:`~compress.config.ModelSpec` ``model`` string:

- ``ViT-B-32@laion2b_s34b_b79k``: open_clip's own loading (downloads where a network exists);
- ``ViT-B-32`` (+ ``pretrained: tag-or-file``): an open_clip or shipped config, random or loaded;
- ``path/to/config.json``: an open_clip model config (``{embed_dim, vision_cfg, text_cfg}``)
  or an open_clip ``open_clip_config.json`` (``{model_cfg, preprocess_cfg}``);
- ``path/to/dir``: a model exported by this project (uniform: open_clip layout);
- ``path/to/weights.safetensors`` / ``.pt``: a checkpoint that carries its config in its
  metadata (written by this project), or is given one with ``pretrained``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import CLIP, CustomTextCLIP
from torch import nn

from compress.models.attention import convert_attention

CONFIG_DIR = Path(__file__).parent / "configs"
#: key of the model config in the metadata of a safetensors file written by this project
METADATA_CONFIG_KEY = "clip_compress.model_cfg"
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"
OPEN_CLIP_WEIGHTS_FILE = "open_clip_model.safetensors"

_registered = False


class ModelLoadError(ValueError):
    """A model could not be resolved or its checkpoint does not match its config."""


def register_shipped_configs() -> None:
    """Make the configs in ``compress/models/configs`` known to open_clip by name."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def list_shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def get_model_config(name: str) -> dict[str, Any]:
    """The open_clip model config of a built-in or shipped model name (a deep copy)."""
    register_shipped_configs()
    cfg = open_clip.get_model_config(name.replace("/", "-"))
    if cfg is None:
        import difflib

        known = open_clip.list_models()
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ModelLoadError(f"unknown model config {name!r}.{hint} See `open_clip.list_models()`.")
    cfg = copy.deepcopy(cfg)
    if name.endswith("-quickgelu"):
        cfg["quick_gelu"] = True
    return cfg


def build_from_config(model_cfg: Mapping[str, Any], convert: bool = True) -> nn.Module:
    """A randomly initialised open_clip CLIP (or CustomTextCLIP) from a model config dict."""
    cfg = copy.deepcopy(dict(model_cfg))
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    model_class = CustomTextCLIP if custom_text else CLIP
    model = model_class(**cfg)
    return _finish(model, model_cfg, name=None, convert=convert)


def _finish(model: nn.Module, model_cfg: Mapping[str, Any], name: str | None, convert: bool) -> nn.Module:
    model.clip_cfg = copy.deepcopy(dict(model_cfg))
    model.clip_cfg.setdefault("quick_gelu", False)
    model.clip_name = name
    if convert:
        convert_attention(model)
    return model


def read_config_file(path: Path) -> dict[str, Any]:
    """An open_clip model config, or the ``model_cfg`` of an ``open_clip_config.json``."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: not valid JSON: {e}") from None
    if "model_cfg" in data:
        data = data["model_cfg"]
    if "vision_cfg" not in data or "text_cfg" not in data:
        raise ModelLoadError(f"{path}: not an open_clip model config (needs vision_cfg and text_cfg)")
    return data


def checkpoint_config(path: Path) -> dict[str, Any] | None:
    """The model config stored in a checkpoint's metadata by this project, if any."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        raw = meta.get(METADATA_CONFIG_KEY)
        return json.loads(raw) if raw else None
    return None


def check_activation(expected: Mapping[str, Any], found: Mapping[str, Any], where: str) -> None:
    """Refuse weights trained with one activation in a model built with the other."""
    want, have = bool(expected.get("quick_gelu", False)), bool(found.get("quick_gelu", False))
    if want != have:
        act = {True: "QuickGELU", False: "GELU"}
        raise ModelLoadError(
            f"{where}: the weights were trained with {act[have]} but the model config uses {act[want]}; "
            f"use the matching config (a '-quickgelu' name, or force_quick_gelu: {str(have).lower()})"
        )


def load_model(
    model: str,
    pretrained: str | None = None,
    force_quick_gelu: bool = False,
    device: str | torch.device = "cpu",
    convert: bool = True,
) -> nn.Module:
    """Resolve a model string (see the module docstring) into a module in eval mode."""
    spec = model
    if "@" in spec and not Path(spec).exists():
        if pretrained is not None:
            raise ModelLoadError(f"{spec!r} names a pretrained tag already; do not also set pretrained")
        spec, pretrained = spec.split("@", 1)

    path = Path(spec)
    if path.is_dir():
        from compress.models.export import load_exported

        result = load_exported(path, convert=convert)
    elif path.suffix == ".json" and path.is_file():
        cfg = read_config_file(path)
        if force_quick_gelu:
            cfg["quick_gelu"] = True
        result = build_from_config(cfg, convert=False)
        if pretrained:
            _load_checkpoint_into(result, Path(pretrained))
        result = _finish(result, cfg, name=path.stem, convert=convert)
    elif path.suffix in (".safetensors", ".pt", ".pth", ".bin") and path.is_file():
        cfg = checkpoint_config(path)
        if cfg is None:
            raise ModelLoadError(
                f"{path}: the checkpoint carries no model config; name the architecture and pass "
                f"the file as pretrained (model: ViT-B-32, pretrained: {path})"
            )
        if force_quick_gelu:
            cfg["quick_gelu"] = True
        result = build_from_config(cfg, convert=False)
        _load_checkpoint_into(result, path)
        result = _finish(result, cfg, name=path.stem, convert=convert)
    else:
        if path.suffix in (".json", ".safetensors", ".pt", ".pth", ".bin"):
            raise ModelLoadError(f"model file not found: {path}")
        cfg = get_model_config(spec)
        if force_quick_gelu:
            cfg["quick_gelu"] = True
        if pretrained and not Path(pretrained).is_file():
            result = _load_open_clip_tag(spec, pretrained, cfg)
        else:
            result = build_from_config(cfg, convert=False)
            if pretrained:
                _load_checkpoint_into(result, Path(pretrained))
        result = _finish(result, cfg, name=spec, convert=convert)
    result.to(device)
    result.eval()
    return result


def _load_open_clip_tag(name: str, tag: str, cfg: dict[str, Any]) -> nn.Module:
    register_shipped_configs()
    tag_cfg = open_clip.get_pretrained_cfg(name, tag)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ModelLoadError(
            f"{tag!r} is neither a pretrained tag of {name!r} nor a file. Known tags: {', '.join(tags) or '(none)'}"
        )
    check_activation(cfg, tag_cfg, f"{name}@{tag}")
    return open_clip.create_model(name, pretrained=tag, force_quick_gelu=bool(cfg.get("quick_gelu")))


def _load_checkpoint_into(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise ModelLoadError(f"checkpoint not found: {path}")
    found = checkpoint_config(path)
    if found is not None:
        check_activation(getattr(model, "clip_cfg", None) or _cfg_of(model), found, str(path))
    try:
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
    except RuntimeError as e:
        raise ModelLoadError(f"{path}: the weights do not fit the model config: {e}") from None


def _cfg_of(model: nn.Module) -> dict[str, Any]:
    """Fallback for a model not yet finished: its activation from its modules."""
    from open_clip.transformer import QuickGELU

    return {"quick_gelu": any(isinstance(m, QuickGELU) for m in model.modules())}
