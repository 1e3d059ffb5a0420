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

Checkpoints are read without unpickling arbitrary objects (safetensors, or ``torch.load``
with ``weights_only=True``), and must fit the config exactly: no key may be missing or
extra and no shape may differ (no silent resizing of position embeddings).
"""

from __future__ import annotations

import copy
import difflib
import json
import pickle
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import CLIP, CustomTextCLIP, set_model_preprocess_cfg
from open_clip.transform import PreprocessCfg
from torch import nn

from compress.models.attention import convert_attention

CONFIG_DIR = Path(__file__).parent / "configs"
#: key of the model config in the metadata of a safetensors file written by this project
METADATA_CONFIG_KEY = "clip_compress.model_cfg"
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"
OPEN_CLIP_WEIGHTS_FILE = "open_clip_model.safetensors"
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
LOCAL_DIR_PREFIX = "local-dir:"

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


def build_from_config(model_cfg: Mapping[str, Any], convert: bool = True) -> nn.Module:
    """A randomly initialised open_clip CLIP (or CustomTextCLIP) from a model config dict."""
    cfg = copy.deepcopy(dict(model_cfg))
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    model_class = CustomTextCLIP if custom_text else CLIP
    try:
        model = model_class(**cfg)
    except (TypeError, KeyError, ValueError, AssertionError) as e:
        raise ModelLoadError(f"invalid open_clip model config: {type(e).__name__}: {e}") from e
    return _finish(model, model_cfg, name=None, convert=convert)


def _finish(model: nn.Module, model_cfg: Mapping[str, Any], name: str | None, convert: bool) -> nn.Module:
    """Attach ``clip_cfg`` / ``clip_name`` (and a default preprocess config), convert attention."""
    model.clip_cfg = copy.deepcopy(dict(model_cfg))
    model.clip_cfg.setdefault("quick_gelu", False)
    model.clip_name = name
    visual = getattr(model, "visual", None)
    if visual is not None and getattr(visual, "preprocess_cfg", None) is None:
        set_preprocess(model)
    if convert:
        convert_attention(model)
    return model


def set_preprocess(model: nn.Module, preprocess: Mapping[str, Any] | None = None) -> None:
    """Record the model's image preprocessing (``model.visual.preprocess_cfg``): ``preprocess``
    over open_clip's defaults, the size the vision tower is built for (as open_clip does)."""
    size = getattr(model.visual, "image_size", 224)
    set_model_preprocess_cfg(model, {**asdict(PreprocessCfg()), **(preprocess or {}), "size": size})


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


def checkpoint_config(path: Path) -> dict[str, Any] | None:
    """The model config stored in a checkpoint's metadata by this project, if any."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own SafetensorError (an Exception)
        raise ModelLoadError(f"{path}: not a readable safetensors file: {e}") from None
    raw = meta.get(METADATA_CONFIG_KEY)
    return json.loads(raw) if raw else None


def check_activation(expected: Mapping[str, Any], found: Mapping[str, Any], where: str) -> None:
    """Refuse weights trained with one activation in a model built with the other.

    ``expected``: the model config; ``found``: the config the weights were trained with (a
    checkpoint's metadata config, or ``open_clip.get_pretrained_cfg(name, tag)``). open_clip
    only warns about this mismatch; the resulting model is silently wrong, so this raises."""
    want, have = bool(expected.get("quick_gelu", False)), bool(found.get("quick_gelu", False))
    if want != have:
        act = {True: "QuickGELU", False: "GELU"}
        raise ModelLoadError(
            f"{where}: the weights were trained with {act[have]} but the model config uses {act[want]}; "
            f"use the matching config (a '-quickgelu' name, or force_quick_gelu: {str(have).lower()})"
        )


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
        from compress.models.export import load_exported

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


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors, never unpickling arbitrary objects.

    Accepts a plain state dict, ``{"state_dict": ...}`` and DDP's ``module.`` prefix."""
    if not path.is_file():
        raise ModelLoadError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path), device="cpu")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelLoadError(
            f"{path}: refused to load with weights_only=True: the file holds pickled objects other "
            f"than tensors (never unpickled here) or is corrupt. torch says: {_unpickling_reason(e)}"
        ) from e
    except Exception as e:  # corrupt file: safetensors / zip / EOF errors of many types
        raise ModelLoadError(f"{path}: not a readable checkpoint: {type(e).__name__}: {e}") from e
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    tensors_only = isinstance(data, Mapping) and all(isinstance(v, torch.Tensor) for v in data.values())
    if not data or not tensors_only:
        raise ModelLoadError(f"{path}: not a state dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in data):
        data = {k.removeprefix("module."): v for k, v in data.items()}
    return dict(data)


def _unpickling_reason(error: Exception) -> str:
    """The specific line of torch's long weights_only error (e.g. the blocked global)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue")
    return " ".join(line for line in lines if not line.startswith(boilerplate)) or (lines or [""])[0]


def check_fits(model: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise :class:`ModelLoadError` listing missing, unexpected and mis-shaped tensors."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{label} ({len(items)}): {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
            if items
        ]
        raise ModelLoadError(f"{where}: the weights do not fit the model config; " + "; ".join(parts))


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a checkpoint into ``model`` exactly (same activation, keys and shapes)."""
    found = checkpoint_config(path) if path.is_file() else None
    if found is not None:
        check_activation(getattr(model, "clip_cfg", None) or _cfg_of(model), found, str(path))
    state = read_state_dict(path)
    own_scale = getattr(model, "logit_scale", None)
    if "logit_scale" in state and own_scale is not None and state["logit_scale"].ndim != own_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(own_scale.shape)  # old scalar format
    check_fits(model, state, str(path))
    model.load_state_dict(state, strict=True)


def _cfg_of(model: nn.Module) -> dict[str, Any]:
    """Fallback for a model not yet finished: its activation from its modules."""
    from open_clip.transformer import QuickGELU

    return {"quick_gelu": any(isinstance(m, QuickGELU) for m in model.modules())}
