"""Manual weight inheritance: fill a smaller student from a larger source by leading slices.

TinyCLIP (Wu et al., "TinyCLIP: CLIP Distillation via Affinity Mimicking and Weight
Inheritance", ICCV 2023), manual inheritance:

- depth: student layer i takes source layer ``i * floor(L_src / L_stu)`` ("interval");
  "uniform" takes ``round(i * (L_src - 1) / (L_stu - 1))`` (first and last kept), "first"
  the first ``L_stu`` layers. ModifiedResNet stages are mapped block by block the same way;
- width: every tensor keeps its leading slice along every axis ("first k"); the packed
  attention projection ``in_proj`` [3 * H * d_h, D] keeps the first ``H_s`` whole heads of
  q, k and v each (``d_h`` must be equal) and the first ``D_s`` input dims.

The mapping works on state dicts through key-name rules, so it does not matter whether
attention was converted to :class:`~compress.models.attention.HeadAttention`. Every student
tensor must match a rule and find its source tensor, or inheritance fails loudly (an
unknown architecture must not silently keep random weights). ``logit_scale`` /
``logit_bias`` and the causal ``attn_mask`` buffer are the student's own.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from open_clip.modified_resnet import AttentionPool2d
from torch import Tensor, nn

from compress.models.attention import HeadAttention

LAYER_CHOICES = ("interval", "uniform", "first")


class InheritanceError(ValueError):
    """The student cannot inherit from the source (larger dimension, unknown tensor, ...)."""


# -- depth --------------------------------------------------------------------------------
def check_layer_choice(choice: str, name: str = "layer_choice") -> str:
    if choice not in LAYER_CHOICES:
        raise ValueError(f"{name}={choice!r} is not a layer choice; options: {', '.join(LAYER_CHOICES)}")
    return choice


def layer_indices(n_source: int, n_student: int, choice: str = "interval") -> list[int]:
    """Source layer of each student layer.

    interval: ``i * floor(L_src / L_stu)`` (TinyCLIP; 12->6: 0,2,4,6,8,10; 12->9: 0..8);
    uniform: ``round(i * (L_src - 1) / (L_stu - 1))`` (first and last kept); first: ``0..L_stu-1``.
    """
    check_layer_choice(choice)
    if n_student > n_source:
        raise InheritanceError(f"a student with {n_student} layers cannot inherit from {n_source} layers")
    if n_student == 0:
        return []
    if choice == "interval":
        step = n_source // n_student
        return [i * step for i in range(n_student)]
    if choice == "uniform":
        if n_student == 1:
            return [0]
        return [math.floor(i * (n_source - 1) / (n_student - 1) + 0.5) for i in range(n_student)]
    return list(range(n_student))


_DEPTH = re.compile(
    r"(?P<prefix>visual\.transformer\.resblocks|visual\.layer(?P<stage>[1-4])|(?:text\.)?transformer\.resblocks)"
    r"\.(?P<index>\d+)\.(?P<rest>.+)"
)


@dataclass(frozen=True)
class LayerKey:
    group: str  # "vision", "text" or "vision.layer1".."vision.layer4"
    prefix: str
    index: int
    rest: str


def split_layer(key: str) -> LayerKey | None:
    """``visual.transformer.resblocks.3.ln_1.weight`` -> (vision, prefix, 3, ln_1.weight)."""
    m = _DEPTH.fullmatch(key)
    if m is None:
        return None
    prefix = m["prefix"]
    group = f"vision.layer{m['stage']}" if m["stage"] else "vision" if prefix.startswith("visual") else "text"
    return LayerKey(group, prefix, int(m["index"]), m["rest"])


def depths(keys: Iterable[str]) -> dict[str, int]:
    """Number of layers of every depth group found among state-dict keys."""
    out: dict[str, int] = {}
    for key in keys:
        lk = split_layer(key)
        if lk is not None:
            out[lk.group] = max(out.get(lk.group, 0), lk.index + 1)
    return out


def _depth_label(group: str) -> str:
    if group.startswith("vision.layer"):
        stage = int(group[-1])
        return f"ResNet stage {stage} blocks (vision_cfg.layers[{stage - 1}])"
    return f"{group} layers ({group}_cfg.layers)"


# -- width rules --------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """How one kind of tensor is inherited: ``slice`` (leading slice of every axis), ``qkv``
    (packed in_proj: first heads of q, k, v), ``heads`` (leading slice after checking the
    owner's head dim), ``skip`` (the student keeps its own). ``exact`` axes must be equal."""

    pattern: str
    axes: tuple[str, ...] = ()
    kind: str = "slice"
    exact: tuple[int, ...] = ()
    heads: str = ""


_VW, _TW = "vision width (vision_cfg.width)", "text width (text_cfg.width)"
_EMBED = "embed dim (embed_dim)"
_RW = "ResNet width (vision_cfg.width)"
_RF = "ResNet feature width (32 x vision_cfg.width)"


def _block_rules(prefix: str, tower: str, width: str) -> list[Rule]:
    """Rules of an open_clip ResidualAttentionBlock under the regex ``prefix``."""
    mlp = f"{tower} MLP width ({tower}_cfg.mlp_ratio)"
    inner = f"{tower} attention size (heads x head dim)"
    heads = f"{tower} heads ({tower}_cfg.width / head_width)" if tower == "vision" else "text heads (text_cfg.heads)"
    b = prefix + r"\.\*\."
    return [
        Rule(b + r"ln_[12]\.(weight|bias)", (width,)),
        Rule(b + r"ls_[12]\.gamma", (width,)),
        Rule(b + r"attn\.in_proj_weight", (inner, width), kind="qkv", heads=heads),
        Rule(b + r"attn\.in_proj_bias", (inner,), kind="qkv", heads=heads),
        Rule(b + r"attn\.out_proj\.weight", (width, inner)),
        Rule(b + r"attn\.out_proj\.bias", (width,)),
        Rule(b + r"mlp\.c_fc\.weight", (mlp, width)),
        Rule(b + r"mlp\.c_fc\.bias", (mlp,)),
        Rule(b + r"mlp\.ln\.(weight|bias)", (mlp,)),
        Rule(b + r"mlp\.c_proj\.weight", (width, mlp)),
        Rule(b + r"mlp\.c_proj\.bias", (width,)),
    ]


_GRID = "{} token grid ((vision_cfg.image_size / {})^2 + 1; a flattened 2D grid cannot be sliced)"
_BN = r"(bn[123]|downsample\.1)\.(weight|bias|running_mean|running_var|num_batches_tracked)"
_ATTNPOOL_HEADS = "attention-pool heads (32 x vision_cfg.width / 64)"

RULES: tuple[Rule, ...] = (
    Rule(r"logit_scale|logit_bias|(.+\.)?attn_mask", kind="skip"),
    # open_clip VisionTransformer
    Rule(r"visual\.class_embedding", (_VW,)),
    Rule(r"visual\.positional_embedding", (_GRID.format("vision", "patch_size"), _VW), exact=(0,)),
    Rule(
        r"visual\.conv1\.weight",
        (_VW, "image channels", "patch size (vision_cfg.patch_size)", "patch size (vision_cfg.patch_size)"),
        exact=(1, 2, 3),
    ),
    Rule(r"visual\.(ln_pre|ln_post)\.(weight|bias)", (_VW,)),
    Rule(r"visual\.proj", (_VW, _EMBED)),
    *_block_rules(r"visual\.transformer\.resblocks", "vision", _VW),
    # open_clip text transformer (on CLIP itself, or under ``text.`` in CustomTextCLIP)
    Rule(r"(text\.)?token_embedding\.weight", ("vocab size (text_cfg.vocab_size)", _TW)),
    Rule(r"(text\.)?positional_embedding", ("context length (text_cfg.context_length)", _TW)),
    Rule(r"(text\.)?ln_final\.(weight|bias)", (_TW,)),
    Rule(r"(text\.)?text_projection", (_TW, _EMBED)),
    Rule(r"(text\.)?text_projection\.weight", (_EMBED, _TW)),
    Rule(r"(text\.)?text_projection\.bias", (_EMBED,)),
    *_block_rules(r"(text\.)?transformer\.resblocks", "text", _TW),
    # open_clip ModifiedResNet: stem, bottleneck stages, attention pool
    Rule(
        r"visual\.(layer[1-4]\.\*\.)?(conv[123]|downsample\.0)\.weight",
        (_RW, _RW, "kernel size", "kernel size"),
        exact=(2, 3),
    ),
    Rule(r"visual\.(layer[1-4]\.\*\.)?" + _BN, (_RW,)),
    Rule(r"visual\.attnpool\.positional_embedding", (_GRID.format("attention-pool", "32"), _RF), exact=(0,)),
    Rule(r"visual\.attnpool\.[qkv]_proj\.weight", (_RF, _RF), kind="heads", heads=_ATTNPOOL_HEADS),
    Rule(r"visual\.attnpool\.[qkv]_proj\.bias", (_RF,), kind="heads", heads=_ATTNPOOL_HEADS),
    Rule(r"visual\.attnpool\.c_proj\.weight", (_EMBED, _RF)),
    Rule(r"visual\.attnpool\.c_proj\.bias", (_EMBED,)),
)
_COMPILED = tuple((re.compile(rule.pattern), rule) for rule in RULES)


def normalized_key(key: str) -> str:
    """The key with its layer index replaced by ``*`` (what the rules match)."""
    lk = split_layer(key)
    return key if lk is None else f"{lk.prefix}.*.{lk.rest}"


def find_rule(key: str) -> Rule | None:
    norm = normalized_key(key)
    for pattern, rule in _COMPILED:
        if pattern.fullmatch(norm):
            return rule
    return None


# -- tensor slicing -----------------------------------------------------------------------
def leading_slice(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``t[:shape[0], :shape[1], ...]`` (a copy)."""
    return t[tuple(slice(0, n) for n in shape)].clone()


def slice_qkv(t: Tensor, heads: int, head_dim: int, keep_heads: int, shape: tuple[int, ...]) -> Tensor:
    """Packed ``in_proj`` [3 * H * d_h, ...]: the first ``keep_heads`` heads of q, k and v each,
    then the leading slice of the remaining (input) axes."""
    per = t.reshape(3, heads, head_dim, *t.shape[1:])[:, :keep_heads]
    per = per.reshape(3 * keep_heads * head_dim, *t.shape[1:])
    return leading_slice(per, shape)


def attention_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{module name: (heads, head_dim)}`` of every attention module (converted or not)."""
    out: dict[str, tuple[int, int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, HeadAttention | nn.MultiheadAttention):
            out[name] = (m.num_heads, m.head_dim)
        elif isinstance(m, AttentionPool2d):
            out[name] = (m.num_heads, m.q_proj.out_features // m.num_heads)
    return out


def _owner(key: str, shapes: Mapping[str, tuple[int, int]]) -> str | None:
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:end])
        if name in shapes:
            return name
    return None


class _Problems:
    """Collects what stops inheritance (one message per dimension) and raises them together."""

    def __init__(self) -> None:
        self.messages: dict[str, str] = {}

    def add(self, topic: str, message: str) -> None:
        self.messages.setdefault(topic, message)

    def raise_if_any(self) -> None:
        if self.messages:
            raise InheritanceError(
                "manual inheritance takes leading slices, so the student must be no larger than its "
                f"source in any dimension and must match its tensors: {'; '.join(self.messages.values())}"
            )


def _check_axes(key: str, s: tuple[int, ...], t: tuple[int, ...], rule: Rule, problems: _Problems) -> bool:
    if len(s) != len(t):
        problems.add(key, f"{key}: the student tensor has {len(s)} axes, the source's {len(t)}")
        return False
    ok = True
    for axis, (ns, nt) in enumerate(zip(s, t, strict=True)):
        label = rule.axes[axis] if axis < len(rule.axes) else f"axis {axis}"
        if axis in rule.exact and ns != nt:
            problems.add(label, f"{label}: student {ns} != source {nt} ({key}); it must equal the source's")
            ok = False
        elif ns > nt:
            problems.add(label, f"{label}: student {ns} > source {nt} ({key}, axis {axis})")
            ok = False
    return ok


def _check_heads(key: str, student: tuple[int, int], source: tuple[int, int], rule: Rule, problems: _Problems) -> bool:
    (hs, ds), (ht, dt) = student, source
    if hs and ds != dt:
        problems.add(
            f"head dim {rule.heads}",
            f"head dim: student {ds} != source {dt} ({key}); manual inheritance keeps whole heads, "
            "so head dims must be equal (vision: head_width; text: width / heads)",
        )
        return False
    if hs > ht:
        problems.add(rule.heads, f"{rule.heads}: student {hs} > source {ht} ({key})")
        return False
    return True


# -- the state-dict mapping ---------------------------------------------------------------
def layer_maps(
    student_keys: Iterable[str], source_keys: Iterable[str], choices: Mapping[str, str], problems: _Problems
) -> dict[str, list[int]]:
    """``{depth group: [source layer of student layer i]}``; groups too deep are reported."""
    stu, src = depths(student_keys), depths(source_keys)
    maps: dict[str, list[int]] = {}
    for group, n in sorted(stu.items()):
        if group not in src:
            problems.add(group, f"the student has {_depth_label(group)} but the source has none")
        elif n > src[group]:
            problems.add(group, f"{_depth_label(group)}: student {n} > source {src[group]}")
        else:
            maps[group] = layer_indices(src[group], n, choices.get(group.split(".")[0], "interval"))
    return maps


def source_key(key: str, maps: Mapping[str, list[int]]) -> str | None:
    lk = split_layer(key)
    if lk is None:
        return key
    if lk.group not in maps:
        return None
    return f"{lk.prefix}.{maps[lk.group][lk.index]}.{lk.rest}"


def inherit_state_dict(
    student_sd: Mapping[str, Tensor],
    source_sd: Mapping[str, Tensor],
    student_heads: Mapping[str, tuple[int, int]],
    source_heads: Mapping[str, tuple[int, int]],
    choices: Mapping[str, str] | None = None,
) -> tuple[dict[str, Tensor], dict[str, list[int]]]:
    """The student's new tensors (one per student key, each from exactly one source key;
    ``skip`` keys are left out) and the layer map. Raises :class:`InheritanceError` listing
    every problem: unknown tensors, missing source tensors, student dimensions too large."""
    problems = _Problems()
    maps = layer_maps(student_sd, source_sd, choices or {}, problems)
    out: dict[str, Tensor] = {}
    skipped: set[str] = set()
    for key, target in student_sd.items():
        rule = find_rule(key)
        if rule is None:
            problems.add(
                key,
                f"no manual-inheritance rule for student tensor {key!r} (known: open_clip "
                "VisionTransformer, text transformer, ModifiedResNet)",
            )
            continue
        if rule.kind == "skip":
            skipped.add(key)
            continue
        src_key = source_key(key, maps)
        if src_key is None:
            continue  # its depth group was already reported
        if src_key not in source_sd:
            problems.add(key, f"student tensor {key!r} has no source tensor {src_key!r}")
            continue
        tensor = _inherit_tensor(key, src_key, target, source_sd[src_key], rule, student_heads, source_heads, problems)
        if tensor is not None:
            out[key] = tensor
    problems.raise_if_any()
    left = set(student_sd) - set(out) - skipped
    if left:
        raise InheritanceError(f"student tensors left without a source: {sorted(left)}")
    return out, maps


def _inherit_tensor(
    key: str,
    src_key: str,
    target: Tensor,
    source: Tensor,
    rule: Rule,
    student_heads: Mapping[str, tuple[int, int]],
    source_heads: Mapping[str, tuple[int, int]],
    problems: _Problems,
) -> Tensor | None:
    shape = tuple(target.shape)
    if rule.kind in ("qkv", "heads"):
        stu_owner, src_owner = _owner(key, student_heads), _owner(src_key, source_heads)
        if stu_owner is None or src_owner is None:
            problems.add(key, f"{key}: no attention module found to read its head count from")
            return None
        heads_ok = _check_heads(key, student_heads[stu_owner], source_heads[src_owner], rule, problems)
        if not heads_ok:
            return None
    if rule.kind == "qkv":
        if not _check_axes(key, shape[1:], tuple(source.shape[1:]), Rule(key, rule.axes[1:]), problems):
            return None
        heads, head_dim = source_heads[src_owner]
        return slice_qkv(source.detach(), heads, head_dim, student_heads[stu_owner][0], shape)
    if not _check_axes(key, shape, tuple(source.shape), rule, problems):
        return None
    return leading_slice(source.detach(), shape)


# -- models -------------------------------------------------------------------------------
def require_clip(model: object, role: str = "model") -> nn.Module:
    """Raise unless ``model`` is an open_clip-style CLIP (``visual``, ``encode_image``, ``encode_text``)."""
    if not isinstance(model, nn.Module) or not all(
        hasattr(model, a) for a in ("visual", "encode_image", "encode_text")
    ):
        raise InheritanceError(
            f"the {role} must be a CLIP model with visual, encode_image and encode_text; got {type(model).__name__}"
        )
    return model


def inheritance_map(
    student: nn.Module, source: nn.Module, choices: Mapping[str, str] | None = None
) -> tuple[dict[str, Tensor], dict[str, list[int]]]:
    """What manual inheritance copies into ``student``, and the layer map, without copying it: every
    check of :func:`inherit_weights` (the dry run calls it on ``meta`` models: shapes only)."""
    require_clip(student, "student")
    require_clip(source, "source")
    kinds = type(student.visual).__name__, type(source.visual).__name__
    if kinds[0] != kinds[1]:
        raise InheritanceError(f"the student's image tower is a {kinds[0]} but the source's a {kinds[1]}")
    return inherit_state_dict(
        student.state_dict(), source.state_dict(), attention_shapes(student), attention_shapes(source), choices
    )


def inherit_weights(
    student: nn.Module, source: nn.Module, choices: Mapping[str, str] | None = None
) -> dict[str, list[int]]:
    """Fill ``student`` in place from ``source`` by manual inheritance; returns the layer map
    (``{"vision": [...], "text": [...]}``, ResNet: ``vision.layer1``..``vision.layer4``)."""
    new, maps = inheritance_map(student, source, choices)
    student_sd = student.state_dict()
    with torch.no_grad():
        for key, tensor in new.items():
            student_sd[key].copy_(tensor)
    return maps
