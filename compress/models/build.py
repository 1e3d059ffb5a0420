"""Build an open_clip model from its config; read, check and write its weight files.

The bottom of model save and load: :mod:`compress.models.structure`, :mod:`~compress.models.nonuniform`,
:mod:`~compress.models.export` and :mod:`~compress.models.factory` (which resolves a model string and
dispatches to them) build on it, and it imports none of them. Checkpoints are read without unpickling
arbitrary objects (safetensors, or ``torch.load`` with ``weights_only=True``) and must fit the config
exactly: no key may be missing or extra and no shape may differ.
"""

from __future__ import annotations

import copy
import json
import pickle
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from open_clip.model import CLIP, CustomTextCLIP, set_model_preprocess_cfg
from open_clip.transform import PreprocessCfg
from safetensors.torch import save_file
from torch import nn

from compress.fileio import atomic_write
from compress.models.attention import convert_attention

#: key of the model config in the metadata of a safetensors file written by this project
METADATA_CONFIG_KEY = "clip_compress.model_cfg"
OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"
OPEN_CLIP_WEIGHTS_FILE = "open_clip_model.safetensors"


class ModelLoadError(ValueError):
    """A model could not be resolved or its checkpoint does not match its config."""


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
