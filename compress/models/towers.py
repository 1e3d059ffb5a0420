"""Where the prunable pieces of a CLIP transformer tower are: one description for masks,
size budgets, pruning and export.

A :class:`Tower` names, for the vision transformer (``model.visual``) or the text
transformer (the ``CLIP`` model itself, or ``CustomTextCLIP.text``):

- the residual blocks (``ln_1, attn, ls_1, ln_2, mlp.c_fc, mlp.c_proj, ls_2``);
- every LayerNorm over the residual width (``ln_1``/``ln_2`` of each block, ``ln_pre``,
  ``ln_post``/``ln_final``);
- the tower-level tensors with a residual-channel axis (:class:`ChannelParam`): embeddings
  (the channel mask is folded into them when pruning), final norm and projection;
- the module whose input is the embedding sum that the channel mask multiplies
  (``visual.ln_pre`` as in TinyCLIP, the text ``transformer``);
- the tower-level tensor axes over other units (:class:`AxisParam`): the joint embedding dims the
  projection writes, the positional-embedding rows, the token-embedding rows (what manual
  inheritance keeps leading slices of; masks never change them).

Prunable parameters (the sizes masks change, and the size budgets count) are every parameter
of the tower except the text token embedding: TinyCLIP's naming convention (ViT-B/32 =
87.85M vision + 38.1M text without the token embedding), i.e. exactly
:func:`~compress.models.params.parameter_report`'s ``vision`` and ``text`` counts. The token
embedding is still pruned along the channel axis, it is only not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from open_clip.transformer import ResidualAttentionBlock, TextTransformer, VisionTransformer
from torch import nn

from compress.models.attention import HeadAttention

TOWERS = ("vision", "text")


class UnsupportedTower(ValueError):
    """The tower cannot carry structured masks (ResNet, attentional pooling, custom blocks...)."""


@dataclass(frozen=True)
class ChannelParam:
    """A tower-level tensor with one residual-channel axis.

    ``fold``: the channel mask multiplies it (the embeddings); ``counted``: it is prunable."""

    key: str
    axis: int
    fold: bool = False
    counted: bool = True


@dataclass(frozen=True)
class AxisParam:
    """A tower-level tensor axis over another unit than the residual channels: ``embed`` (the joint
    embedding dims the projection writes), ``positions`` (positional-embedding rows), ``vocab``
    (token-embedding rows)."""

    key: str
    axis: int
    unit: str


@dataclass
class Tower:
    name: str
    prefix: str  # state-dict prefix of the tower's own parameters: "visual.", "" or "text."
    root: nn.Module  # the module those names are relative to
    attrs: tuple[str, ...]  # attributes of ``root`` that belong to the tower
    transformer: nn.Module
    embed_site: nn.Module
    channel_params: tuple[ChannelParam, ...]
    axis_params: tuple[AxisParam, ...] = ()

    @property
    def blocks(self) -> list[ResidualAttentionBlock]:
        return list(self.transformer.resblocks)

    @property
    def blocks_prefix(self) -> str:
        return f"{self.prefix}transformer.resblocks."

    @property
    def width(self) -> int:
        return int(self.transformer.width)

    def norm_slots(self) -> list[tuple[nn.Module, str]]:
        """(parent, attribute) of every LayerNorm over the residual width."""
        slots = [(b, n) for b in self.blocks for n in ("ln_1", "ln_2")]
        for name in ("ln_pre", "ln_post", "ln_final"):
            if isinstance(getattr(self.root, name, None), nn.LayerNorm) and name in self.attrs:
                slots.append((self.root, name))
        return slots

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(state-dict key, parameter) of every parameter of the tower."""
        out = []
        for attr in self.attrs:
            value = getattr(self.root, attr, None)
            if isinstance(value, nn.Parameter):
                out.append((f"{self.prefix}{attr}", value))
            elif isinstance(value, nn.Module):
                out.extend((f"{self.prefix}{attr}.{n}", p) for n, p in value.named_parameters())
        return out

    def counted_keys(self) -> list[str]:
        skip = {c.key for c in self.channel_params if not c.counted}
        return [k for k, _ in self.named_parameters() if k not in skip]


def _check_blocks(transformer: nn.Module, where: str, converted: bool = True) -> None:
    for i, block in enumerate(transformer.resblocks):
        if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv"):
            raise UnsupportedTower(f"{where}: block {i} is a {type(block).__name__}; only open_clip's "
                                   "ResidualAttentionBlock (self-attention) can carry structured masks")
        if converted and not isinstance(block.attn, HeadAttention):
            raise UnsupportedTower(f"{where}: block {i} attention is not converted; call convert_attention first")


def vision_tower(model: nn.Module, converted: bool = True) -> Tower:
    """The vision transformer tower (``converted``: its attention must be :class:`HeadAttention`, as masks need;
    ``False`` reads an unconverted one, whose ``nn.MultiheadAttention`` has the same tensors)."""
    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer):
        raise UnsupportedTower(
            f"the vision tower is a {type(visual).__name__}; structured masks need a VisionTransformer "
            "(mask the text tower only with towers: text)"
        )
    if visual.attn_pool is not None or visual.proj is None:
        raise UnsupportedTower("vision towers with attentional pooling or without projection are not supported")
    _check_blocks(visual.transformer, "vision tower", converted)
    params = [ChannelParam("visual.conv1.weight", 0, fold=True)]
    if visual.conv1.bias is not None:
        params.append(ChannelParam("visual.conv1.bias", 0, fold=True))
    params += [
        ChannelParam("visual.class_embedding", 0, fold=True),
        ChannelParam("visual.positional_embedding", 1, fold=True),
    ]
    for ln in ("ln_pre", "ln_post"):
        if isinstance(getattr(visual, ln), nn.LayerNorm):
            params += [ChannelParam(f"visual.{ln}.weight", 0), ChannelParam(f"visual.{ln}.bias", 0)]
    params.append(ChannelParam("visual.proj", 0))
    attrs = tuple(n for n, _ in visual.named_children()) + tuple(n for n, _ in visual.named_parameters(recurse=False))
    axes = (AxisParam("visual.positional_embedding", 0, "positions"), AxisParam("visual.proj", 1, "embed"))
    return Tower("vision", "visual.", visual, attrs, visual.transformer, visual.ln_pre, tuple(params), axes)


def text_tower(model: nn.Module, converted: bool = True) -> Tower:
    text = getattr(model, "text", None)
    if text is not None and not isinstance(text, TextTransformer):
        raise UnsupportedTower(f"the text tower is a {type(text).__name__}; structured masks need open_clip's "
                               "TextTransformer")
    root, prefix = (text, "text.") if text is not None else (model, "")
    if text is not None and (text.cls_emb is not None or text.use_pad_mask):
        raise UnsupportedTower("text towers with a CLS token or padding masks (per-head attention masks) "
                               "are not supported")
    if not hasattr(root, "token_embedding") or not hasattr(root, "transformer"):
        raise UnsupportedTower(f"{type(model).__name__} has no open_clip text transformer")
    _check_blocks(root.transformer, "text tower", converted)
    params = [
        ChannelParam(f"{prefix}token_embedding.weight", 1, fold=True, counted=False),
        ChannelParam(f"{prefix}positional_embedding", 1, fold=True),
        ChannelParam(f"{prefix}ln_final.weight", 0),
        ChannelParam(f"{prefix}ln_final.bias", 0),
    ]
    axes = [AxisParam(f"{prefix}token_embedding.weight", 0, "vocab")]
    axes.append(AxisParam(f"{prefix}positional_embedding", 0, "positions"))
    proj = root.text_projection
    if isinstance(proj, nn.Linear):
        params.append(ChannelParam(f"{prefix}text_projection.weight", 1))
        axes.append(AxisParam(f"{prefix}text_projection.weight", 0, "embed"))
        if proj.bias is not None:
            axes.append(AxisParam(f"{prefix}text_projection.bias", 0, "embed"))
    elif proj is not None:
        params.append(ChannelParam(f"{prefix}text_projection", 0))
        axes.append(AxisParam(f"{prefix}text_projection", 1, "embed"))
    attrs = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
    if text is not None:
        attrs = tuple(n for n, _ in text.named_children()) + tuple(n for n, _ in text.named_parameters(recurse=False))
    return Tower("text", prefix, root, attrs, root.transformer, root.transformer, tuple(params), tuple(axes))


def get_tower(model: nn.Module, name: str, converted: bool = True) -> Tower:
    if name == "vision":
        return vision_tower(model, converted)
    if name == "text":
        return text_tower(model, converted)
    raise ValueError(f"unknown tower {name!r}; known: {', '.join(TOWERS)}")


def unused_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters no forward of ``model`` reads (a data-parallel wrapper that expects a gradient for every
    parameter it holds must leave them out): every zero-element tensor (the weights of a layer pruned to no
    heads, or to no MLP neurons), and the pre-attention LayerNorm of an open_clip block whose attention has no
    heads (:class:`HeadAttention` then adds its ``out_proj`` bias alone, whatever its input)."""
    found = {id(p): p for p in model.parameters() if p.numel() == 0}
    for block in model.modules():
        attn = getattr(block, "attn", None)
        if isinstance(block, ResidualAttentionBlock) and isinstance(attn, HeadAttention) and not attn.num_heads:
            found.update({id(p): p for p in block.ln_1.parameters()})
    return list(found.values())


def resolve_towers(towers: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"both"`` / ``"vision"`` / ``"text"`` (or a list of them) -> a tuple of tower names."""
    if isinstance(towers, str):
        towers = TOWERS if towers == "both" else (towers,)
    names = tuple(towers)
    unknown = [t for t in names if t not in TOWERS]
    if unknown or not names:
        raise ValueError(f"towers must be 'both', 'vision' or 'text' (or a list of them), got {towers!r}")
    return names
