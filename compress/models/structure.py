"""The one place that rewrites head counts, MLP widths and residual widths of a converted model.

A *structure* describes the transformer towers of a (possibly non-uniform) CLIP model::

    {"vision": {"width": 48, "head_dim": 16, "heads": [4, 0, 3, 2], "mlp_width": [256, 200, 180, 0],
                "full": {"width": 64, "heads": [4, 4, 4, 4], "mlp_width": [256, 256, 256, 256]}},
     "text": {...}}

``width`` is the residual width, ``heads`` / ``mlp_width`` are per layer, and ``full`` the
same counts for the model config the structure is relative to (for reports; the report of a
run is relative to the model it inherited from, :func:`describe_against`, where ``layers``, the
source layer of each layer, aligns a shallower tower). Towers missing from the dict keep the
model config's shapes.

- :func:`apply_structure` replaces the modules of a model built from its config by modules
  of the structure's shapes (on the meta device: they are filled by ``load_state_dict(...,
  assign=True)``); loading a non-uniform export and pruning both go through it.
- :func:`select_state` is the one slicing rule: the state dict of a model keeping given layers,
  residual channels, heads, MLP neurons and other units (:class:`TowerKeep`; index selection, the
  qkv layout ``in_proj`` [3, H, d_h, D] written only here), the model itself left as it is. Manual
  inheritance hands it leading units and interval layers and fills a student built at its config.
- :func:`prune_model` keeps given channels / heads / neurons (the masks' values must already be
  folded into the weights): :func:`select_state`, then the modules rebuilt at the kept shapes,
  exactly equivalent to the masked model.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from einops import rearrange
from open_clip.transformer import LayerScale
from torch import Tensor, nn

from compress.models.attention import HeadAttention
from compress.models.build import build_from_config
from compress.models.towers import TOWERS, Tower, UnsupportedTower, get_tower


@dataclass
class TowerKeep:
    """Kept indices of one tower: residual channels, heads and MLP neurons of every kept layer; ``layers``
    the source block of each kept layer (``None``: every block, in order); ``units`` kept indices along the
    tower's other axes (:class:`~compress.models.towers.AxisParam`: ``embed``, ``positions``, ``vocab``;
    a unit not named keeps all)."""

    channels: Tensor
    heads: list[Tensor]
    neurons: list[Tensor]
    layers: list[int] | None = None
    units: Mapping[str, Tensor] = field(default_factory=dict)


# -- describing ------------------------------------------------------------------------
def tower_structure(tower: Tower) -> dict[str, Any]:
    blocks = tower.blocks
    head_dims = {b.attn.head_dim for b in blocks}
    if len(head_dims) > 1:
        raise UnsupportedTower(f"{tower.name} tower: the head dim differs between layers ({sorted(head_dims)})")
    return {
        "width": tower.width,
        "head_dim": head_dims.pop() if head_dims else 0,
        "heads": [int(b.attn.num_heads) for b in blocks],
        "mlp_width": [int(b.mlp.c_fc.out_features) for b in blocks],
    }


def describe_structure(model: nn.Module, towers: tuple[str, ...] = TOWERS) -> dict[str, Any]:
    """The structure of ``model``'s transformer towers (towers that are not transformers are left out),
    with ``full`` taken from ``model.clip_cfg`` when the model has one."""
    reference = None
    cfg = getattr(model, "clip_cfg", None)
    if cfg is not None:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = build_from_config(cfg, convert=True)
    out: dict[str, Any] = {}
    for name in towers:
        try:
            own = tower_structure(get_tower(model, name))
        except UnsupportedTower:
            continue
        full = tower_structure(get_tower(reference, name)) if reference is not None else own
        out[name] = {**own, "full": {k: full[k] for k in ("width", "heads", "mlp_width")}}
    return out


def describe_against(
    model: nn.Module, source: nn.Module, layer_map: Mapping[str, list[int]] | None = None,
    towers: tuple[str, ...] = TOWERS,
) -> dict[str, Any]:
    """:func:`describe_structure` for reports, with ``full`` the shapes of ``source``, the model ``model``
    inherited from (the teacher, or a previous stage's model): what was kept of it, as TinyCLIP counts a
    student's sparsity against its teacher. ``layer_map`` ({tower: [source layer of layer i]}, manual
    inheritance's) aligns a shallower tower with the source's layers; it is written as ``layers`` where
    the depths differ. A tower the source lacks, or a shallower one without a map, keeps its own config."""
    out = describe_structure(model, towers)
    for name, t in out.items():
        try:
            reference = tower_structure(get_tower(source, name))
        except UnsupportedTower:
            continue
        depth, source_depth = len(t["heads"]), len(reference["heads"])
        mapped = (layer_map or {}).get(name)
        layers = list(mapped) if mapped is not None else list(range(depth)) if depth == source_depth else []
        if len(layers) != depth or not all(0 <= j < source_depth for j in layers):
            continue  # the layers cannot be matched: its own config stays the reference
        t["full"] = {k: reference[k] for k in ("width", "heads", "mlp_width")}
        if depth != source_depth:
            t["layers"] = layers
    return out


def mlp_ratio(width: int, mlp_width: int) -> float | None:
    """The ``mlp_ratio`` from which open_clip builds ``mlp_width`` neurons (``int(width * mlp_ratio)``): the
    quotient, or the next float above it where the quotient's product rounds down (704 x (1480 / 704) is
    1479.99...); None where neither gives ``mlp_width``."""
    ratio = mlp_width / width
    for r in (ratio, math.nextafter(ratio, math.inf)):
        if int(width * r) == mlp_width:
            return r
    return None


def open_clip_config(cfg: Mapping[str, Any], structure: Mapping[str, Any]) -> dict[str, Any] | None:
    """The open_clip model config of a structure that open_clip can build (every layer alike: one MLP width, and
    either all heads and the full width kept, or a narrower width ``heads x head_dim`` with that many heads in
    every layer, as open_clip ties them), else None."""
    new = copy.deepcopy(dict(cfg))
    for name, t in structure.items():
        full = t["full"]
        key = "vision_cfg" if name == "vision" else "text_cfg"
        if len(set(t["mlp_width"])) > 1:
            return None
        if t["width"] != full["width"]:
            heads = set(t["heads"])
            if len(heads) != 1 or next(iter(heads)) * t["head_dim"] != t["width"]:
                return None
            if name == "vision" and t["head_dim"] != new[key].get("head_width", 64):
                return None
            new[key]["width"] = t["width"]
            if name == "text":
                new[key]["heads"] = t["heads"][0]
        elif t["heads"] != full["heads"]:
            return None
        if t["mlp_width"] and (t["mlp_width"] != full["mlp_width"] or t["width"] != full["width"]):
            ratio = mlp_ratio(t["width"], t["mlp_width"][0])
            if ratio is None:
                return None
            new[key]["mlp_ratio"] = ratio
    return new


# -- rewriting shapes ------------------------------------------------------------------
def _norm(old: nn.Module, width: int) -> nn.Module:
    """A LayerNorm of the same class and eps as ``old`` over ``width`` channels."""
    return type(old)(width, eps=old.eps, elementwise_affine=old.elementwise_affine, bias=old.bias is not None)


def _linear(old: nn.Linear, n_in: int, n_out: int) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=old.bias is not None)


def _resize_block(block: nn.Module, width: int, heads: int, head_dim: int, mlp_width: int) -> None:
    attn = block.attn
    block.ln_1 = _norm(block.ln_1, width)
    block.ln_2 = _norm(block.ln_2, width)
    block.attn = HeadAttention(width, heads, head_dim, batch_first=attn.batch_first, bias=attn.in_proj_bias is not None)
    block.mlp.c_fc = _linear(block.mlp.c_fc, width, mlp_width)
    block.mlp.c_proj = _linear(block.mlp.c_proj, mlp_width, width)
    if isinstance(getattr(block.mlp, "ln", None), nn.LayerNorm):  # open_clip's scale_fc
        block.mlp.ln = _norm(block.mlp.ln, mlp_width)
    for name in ("ls_1", "ls_2"):
        old = getattr(block, name)
        if isinstance(old, LayerScale):
            setattr(block, name, LayerScale(width, inplace=old.inplace))


def _resize_tower_io(tower: Tower, width: int) -> None:
    """New tower-level modules / parameters with ``width`` channels (embeddings, norms, projection)."""
    root = tower.root
    for name in ("ln_pre", "ln_post", "ln_final"):
        if name in tower.attrs and isinstance(getattr(root, name, None), nn.LayerNorm):
            setattr(root, name, _norm(getattr(root, name), width))
    if tower.name == "vision":
        c = root.conv1
        root.conv1 = nn.Conv2d(c.in_channels, width, c.kernel_size, c.stride, bias=c.bias is not None)
        root.class_embedding = nn.Parameter(torch.empty(width))
        root.positional_embedding = nn.Parameter(torch.empty(root.positional_embedding.shape[0], width))
        root.proj = nn.Parameter(torch.empty(width, root.proj.shape[1]))
        return
    emb = root.token_embedding
    root.token_embedding = nn.Embedding(emb.num_embeddings, width)
    root.positional_embedding = nn.Parameter(torch.empty(root.positional_embedding.shape[0], width))
    proj = root.text_projection
    if isinstance(proj, nn.Linear):
        root.text_projection = _linear(proj, width, proj.out_features)
    elif proj is not None:
        root.text_projection = nn.Parameter(torch.empty(width, proj.shape[1]))
    if hasattr(root, "width"):
        root.width = width


def apply_structure(model: nn.Module, structure: Mapping[str, Any]) -> nn.Module:
    """Give ``model``'s towers the shapes of ``structure`` (in place). New modules live on the
    meta device: fill them with ``model.load_state_dict(state, strict=True, assign=True)``."""
    for name, spec in structure.items():
        tower = get_tower(model, name)
        heads, mlp = list(spec["heads"]), list(spec["mlp_width"])
        if len(heads) != len(tower.blocks) or len(mlp) != len(tower.blocks):
            raise ValueError(f"{name}: the structure has {len(heads)} layers, the model {len(tower.blocks)}")
        width, head_dim = int(spec["width"]), int(spec["head_dim"])
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zero-element tensors (a layer without heads or neurons)
            for block, h, f in zip(tower.blocks, heads, mlp, strict=True):
                _resize_block(block, width, int(h), head_dim, int(f))
            _resize_tower_io(tower, width)
        tower.transformer.width = width
    return model


# -- pruning by kept indices -----------------------------------------------------------
def _block_slices(
    state: dict[str, Tensor], prefix: str, ch: Tensor, heads: Tensor, neurons: Tensor, head_dim: int
) -> None:
    """Select kept channels ``ch``, heads and neurons in the tensors of one block (in ``state``)."""
    def take(key: str, fn) -> None:
        if key in state:
            state[key] = fn(state[key]).contiguous()

    n_in = state[f"{prefix}attn.out_proj.weight"].shape[1]
    h = n_in // head_dim if head_dim else 0
    def kept_heads(t: Tensor, split: str, joined: str, **axes: int) -> Tensor:  # ``heads`` of an (h d) axis
        return rearrange(rearrange(t, split, h=h, d=head_dim, **axes)[heads], joined)

    take(f"{prefix}attn.in_proj_weight",
         lambda w: kept_heads(w[:, ch], "(qkv h d) c -> h qkv d c", "h qkv d c -> (qkv h d) c", qkv=3))
    take(f"{prefix}attn.in_proj_bias", lambda b: kept_heads(b, "(qkv h d) -> h qkv d", "h qkv d -> (qkv h d)", qkv=3))
    take(f"{prefix}attn.out_proj.weight", lambda w: kept_heads(w[ch], "c (h d) -> h c d", "h c d -> c (h d)"))
    take(f"{prefix}mlp.c_fc.weight", lambda w: w[neurons][:, ch])
    take(f"{prefix}mlp.c_fc.bias", lambda b: b[neurons])
    take(f"{prefix}mlp.ln.weight", lambda t: t[neurons])
    take(f"{prefix}mlp.ln.bias", lambda t: t[neurons])
    take(f"{prefix}mlp.c_proj.weight", lambda w: w[ch][:, neurons])
    for key in ("attn.out_proj.bias", "mlp.c_proj.bias", "ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias",
                "ls_1.gamma", "ls_2.gamma"):
        take(f"{prefix}{key}", lambda t: t[ch])


def _select(t: Tensor, axis: int, kept: Tensor) -> Tensor:
    """``t`` keeping the indices ``kept`` along ``axis`` (a new tensor), or ``t`` itself when ``kept`` is every
    index in order: a tensor with two selected axes (the token embedding) is then copied at most once."""
    if len(kept) == t.shape[axis] and torch.equal(kept.detach().cpu().long(), torch.arange(len(kept))):
        return t
    return t.index_select(axis, kept.to(device=t.device, dtype=torch.long)).contiguous()


def _select_layers(state: dict[str, Tensor], prefix: str, depth: int, layers: list[int]) -> None:
    """Renumber the blocks of one tower in ``state``: block ``i`` takes the tensors of block ``layers[i]``
    (moved, not copied); the blocks not kept are dropped."""
    if any(not 0 <= j < depth for j in layers):
        raise ValueError(f"{prefix}: kept layers {layers} outside the {depth} blocks")
    blocks: list[dict[str, Tensor]] = [{} for _ in range(depth)]
    for key in [k for k in state if k.startswith(prefix)]:
        index, _, rest = key[len(prefix):].partition(".")
        blocks[int(index)][rest] = state.pop(key)
    for i, j in enumerate(layers):
        state.update({f"{prefix}{i}.{rest}": t for rest, t in blocks[j].items()})


def select_state(
    model: nn.Module, keep: Mapping[str, TowerKeep], converted: bool = True
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``model``'s state dict keeping only the given layers, channels, heads, neurons and units of each tower
    (new tensors where anything is selected; ``model`` is left as it is), and the structure it has (see
    :func:`describe_structure`, without ``full``). ``converted=False`` also reads ``nn.MultiheadAttention``."""
    state = model.state_dict()
    structure: dict[str, Any] = {}
    for name, k in keep.items():
        tower = get_tower(model, name, converted)
        device = state[f"{tower.blocks_prefix}0.ln_1.weight"].device if tower.blocks else None
        ch = k.channels.to(device=device, dtype=torch.long)
        head_dim = tower_structure(tower)["head_dim"]
        if k.layers is not None:
            _select_layers(state, tower.blocks_prefix, len(tower.blocks), list(k.layers))
        if len(k.heads) != len(k.neurons) or len(k.heads) != (len(tower.blocks) if k.layers is None else len(k.layers)):
            raise ValueError(f"{name}: the kept heads and neurons do not name every kept layer")
        for i, (h, n) in enumerate(zip(k.heads, k.neurons, strict=True)):
            _block_slices(state, f"{tower.blocks_prefix}{i}.", ch, h.to(ch), n.to(ch), head_dim)
        for p in tower.channel_params:
            state[p.key] = _select(state[p.key], p.axis, k.channels)
        for a in tower.axis_params:
            if a.unit in k.units:
                state[a.key] = _select(state[a.key], a.axis, k.units[a.unit])
        structure[name] = {"width": len(ch), "head_dim": head_dim, "heads": [len(h) for h in k.heads],
                           "mlp_width": [len(n) for n in k.neurons]}
    return state, structure


def prune_model(model: nn.Module, keep: Mapping[str, TowerKeep]) -> nn.Module:
    """Keep only the given channels, heads and neurons of each tower (in place; returns ``model``).

    Mask values must already be folded into the weights: this only selects (:func:`select_state`) and
    rebuilds the modules at the kept shapes. Every layer and every other unit stays (the modules of a
    shallower tower or of fewer embedding dims are not rebuilt here). The result carries
    ``model.clip_structure`` (see :func:`describe_structure`); its ``clip_cfg`` is the open_clip
    config of the result when open_clip can build it, else the source's config."""
    if any(k.layers is not None or k.units for k in keep.values()):
        raise ValueError("prune_model keeps every layer and every embedding unit; select_state selects them "
                         "for a caller that builds the modules (manual inheritance)")
    state, structure = select_state(model, keep)
    apply_structure(model, structure)
    model.load_state_dict(state, strict=True, assign=True)
    _check_materialized(model)
    model.clip_structure = describe_structure(model)
    cfg = getattr(model, "clip_cfg", None)
    if cfg is not None:
        model.clip_cfg = open_clip_config(cfg, model.clip_structure) or cfg
    return model


def _check_materialized(model: nn.Module) -> None:
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left without values after restructuring: {', '.join(left[:5])}")

