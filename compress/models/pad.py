"""Rewrite a non-uniform student as a uniform open_clip model computing the same function.

A non-uniform student (per-layer head counts and MLP widths, as learnable masks leave it; see
:mod:`compress.models.structure`) is padded, layer by layer, to ``H = width / head_dim`` heads and
``F = max_l mlp_width_l`` MLP neurons, the padding all zeros:

- a zero head has ``q = k = v = 0`` (zero rows of ``in_proj`` and of its bias), so
  ``softmax(q k^T / sqrt(d)) v = 0`` whatever the attention weights, and its ``out_proj`` columns are
  zero: it adds nothing to the block's output;
- a zero MLP neuron has ``act(0 . x + 0) = act(0) = 0`` (GELU and QuickGELU both vanish at 0) and a
  zero ``c_proj`` column: it adds nothing either.

The residual width, the head dim (hence the ``1/sqrt(d)`` attention scale), LayerNorms, embeddings and
projections are unchanged, so the padded model is the same function, and open_clip builds it from its
config alone (``vision_cfg.head_width = d``, ``text_cfg.heads = width / d``, ``mlp_ratio = F / width``).
Numerically, with this project's attention (``convert=True``) the padded model gives the same bits
(adding exact zeros); open_clip's ``nn.MultiheadAttention`` differs from it at float rounding (about
1e-6 at width 64), as the unpadded teacher does (:func:`~compress.models.attention.convert_attention`).

Refused (one line, naming the tower and the reason) where no such padding exists: a layer keeping more
heads than ``width / head_dim`` (kept inner width above the residual width, after residual channels were
pruned), a width that is not a multiple of the head dim, or a LayerNorm inside the MLP (open_clip's
``scale_fc``: its statistics would change with zero neurons). Padding the residual width itself is never
exact (LayerNorm's mean and variance are taken over every channel), so it is never done.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor, nn

from compress.models.build import ModelLoadError, build_from_config, check_fits, set_preprocess
from compress.models.structure import mlp_ratio, tower_structure
from compress.models.towers import TOWERS, UnsupportedTower, get_tower

_CFG_KEY = {"vision": "vision_cfg", "text": "text_cfg"}


class PaddingError(ModelLoadError):
    """The model has no uniform open_clip form computing the same function."""


def uniform_config(cfg: dict[str, Any], structure: dict[str, Any]) -> dict[str, Any]:
    """The open_clip config of ``structure`` padded to uniform layers (see the module docstring), or
    :class:`PaddingError` naming the tower and why not."""
    new = copy.deepcopy(dict(cfg))
    for name, t in structure.items():
        width, head_dim, heads, mlp = int(t["width"]), int(t["head_dim"]), t["heads"], t["mlp_width"]
        tower_cfg = new[_CFG_KEY[name]]
        if head_dim <= 0 or width % head_dim:
            raise PaddingError(f"{name} tower: residual width {width} is not a multiple of the head dim {head_dim}")
        n_heads = width // head_dim
        if max(heads, default=0) > n_heads:
            raise PaddingError(
                f"{name} tower: a layer keeps {max(heads)} heads of dim {head_dim} (inner width "
                f"{max(heads) * head_dim}) but residual width {width} allows {n_heads}; open_clip cannot hold it"
            )
        if tower_cfg.get("scale_fc") and len(set(mlp)) > 1:
            raise PaddingError(f"{name} tower: scale_fc puts a LayerNorm over the MLP neurons, zero neurons change it")
        tower_cfg["width"] = width
        if name == "vision":
            tower_cfg["head_width"] = head_dim
        else:
            tower_cfg["heads"] = n_heads
        tower_cfg["mlp_ratio"] = _mlp_ratio(max(mlp, default=0), width)
    return new


def _mlp_ratio(mlp_width: int, width: int) -> float:
    """A float ``r`` with ``int(width * r) == mlp_width`` (open_clip's rule for the MLP width)."""
    ratio = mlp_ratio(width, mlp_width)
    if ratio is None:
        raise PaddingError(f"no float mlp_ratio gives an MLP width of {mlp_width} at width {width}")
    return ratio


def model_structure(model: nn.Module) -> dict[str, Any]:
    """Per transformer tower: ``width``, ``head_dim``, per-layer ``heads`` and ``mlp_width`` (attention
    converted or not); towers that are not open_clip transformers (ResNet...) are left out."""
    out = {}
    for name in TOWERS:
        try:
            out[name] = tower_structure(get_tower(model, name, converted=False))
        except UnsupportedTower:
            continue
    return out


def _pad(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``t`` in the leading corner of a zero tensor of ``shape``."""
    out = t.new_zeros(shape)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def _pad_block(state: dict[str, Tensor], prefix: str, width: int, head_dim: int, n_heads: int, mlp: int) -> None:
    """Pad one block's attention to ``n_heads`` heads and its MLP to ``mlp`` neurons (in ``state``)."""
    key = f"{prefix}attn.in_proj_weight"
    h = state[key].shape[0] // (3 * head_dim)
    state[key] = _pad(state[key].view(3, h, head_dim, width), (3, n_heads, head_dim, width)).view(-1, width)
    if f"{prefix}attn.in_proj_bias" in state:
        bias = state[f"{prefix}attn.in_proj_bias"].view(3, h, head_dim)
        state[f"{prefix}attn.in_proj_bias"] = _pad(bias, (3, n_heads, head_dim)).view(-1)
    state[f"{prefix}attn.out_proj.weight"] = _pad(state[f"{prefix}attn.out_proj.weight"], (width, n_heads * head_dim))
    state[f"{prefix}mlp.c_fc.weight"] = _pad(state[f"{prefix}mlp.c_fc.weight"], (mlp, width))
    if f"{prefix}mlp.c_fc.bias" in state:
        state[f"{prefix}mlp.c_fc.bias"] = _pad(state[f"{prefix}mlp.c_fc.bias"], (mlp,))
    state[f"{prefix}mlp.c_proj.weight"] = _pad(state[f"{prefix}mlp.c_proj.weight"], (width, mlp))


def padded_state(model: nn.Module, structure: dict[str, Any]) -> dict[str, Tensor]:
    """``model``'s state dict with every block of the towers in ``structure`` padded with zero heads and
    zero neurons to the tower's uniform shape (the other tensors are the model's own)."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for name, t in structure.items():
        tower = get_tower(model, name, converted=False)
        width, head_dim = int(t["width"]), int(t["head_dim"])
        n_heads, mlp = width // head_dim, max(t["mlp_width"], default=0)
        for i in range(len(tower.blocks)):
            _pad_block(state, f"{tower.blocks_prefix}{i}.", width, head_dim, n_heads, mlp)
    return state


def pad_to_uniform(model: nn.Module, convert: bool = False) -> nn.Module:
    """``model`` (a student with ``clip_cfg``, uniform or not) as the uniform open_clip model computing the
    same function (module docstring): built from its padded config as open_clip builds it
    (``nn.MultiheadAttention``; ``convert=True``: this project's attention), in eval mode on ``model``'s
    device, with ``clip_cfg`` the padded config, ready for ``compress.models.export.save_open_clip``.

    Raises :class:`PaddingError` (one line) where no uniform form exists; ``model`` is left unchanged."""
    cfg = getattr(model, "clip_cfg", None)
    if cfg is None:
        raise PaddingError("the model has no clip_cfg: create it with compress.models.load_model")
    # not at the top: compress.masks imports compress.models
    from compress.masks.attach import get_masks

    if get_masks(model) is not None:
        raise PaddingError("the model carries learnable masks; prune them (compress.masks.prune_masked) first")
    structure = model_structure(model)
    new_cfg = uniform_config(cfg, structure)
    state = padded_state(model, structure)
    padded = build_from_config(new_cfg, convert=convert)  # real tensors: non-persistent buffers (the text mask)
    check_fits(padded, state, "pad_to_uniform")
    padded.load_state_dict(state, strict=True)
    set_preprocess(padded, getattr(model.visual, "preprocess_cfg", None))
    padded.clip_name = getattr(model, "clip_name", None)
    reference = next(iter(state.values()))
    return padded.to(device=reference.device, dtype=reference.dtype).eval()
