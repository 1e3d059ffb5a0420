"""Manual weight inheritance: choose what a smaller student keeps of a larger source.

TinyCLIP (Wu et al., "TinyCLIP: CLIP Distillation via Affinity Mimicking and Weight
Inheritance", ICCV 2023), manual inheritance:

- depth: student layer i takes source layer ``i * floor(L_src / L_stu)`` ("interval");
  "uniform" takes ``round(i * (L_src - 1) / (L_stu - 1))`` (first and last kept), "first"
  the first ``L_stu`` layers. ModifiedResNet stages are mapped block by block the same way;
- width: the leading units of every kind: the first ``D_s`` residual channels, the first
  ``H_s`` whole heads of q, k and v (``d_h`` must be equal), the first ``F_s`` MLP neurons,
  the first embedding dims, token positions and vocabulary rows.

This module only chooses (:class:`~compress.models.structure.TowerKeep` per transformer tower);
the one slicing rule, :func:`~compress.models.structure.select_state` (the selection of
``prune_model``, which the masks' export uses), takes them out of the source, which stays as it
is. A ModifiedResNet image tower is not a transformer tower (no heads, neurons or residual
stream that the structure code describes): every tensor of it takes its leading slice along
every axis, the kernel and the attention-pool grid being equal (:func:`_resnet_tensors`).
Every student tensor must receive a source tensor of its shape, or inheritance fails loudly
(an unknown architecture must not silently keep random weights); ``logit_scale`` /
``logit_bias`` and the causal ``attn_mask`` buffer are the student's own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from open_clip.modified_resnet import AttentionPool2d, ModifiedResNet
from torch import Tensor, nn

from compress.models.structure import TowerKeep, select_state, tower_structure
from compress.models.towers import TOWERS, Tower, UnsupportedTower, get_tower

LAYER_CHOICES = ("interval", "uniform", "first")
OWN_TENSORS = ("logit_scale", "logit_bias", "attn_mask")  # the student's own (last part of the key)


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


class _Problems:
    """Collects what stops inheritance (one message per dimension) and raises them together."""

    def __init__(self) -> None:
        self.messages: dict[str, str] = {}

    def add(self, topic: str, message: str) -> None:
        self.messages.setdefault(topic, message)

    def larger(self, label: str, student: int, source: int, where: str | None, exact: bool = False) -> bool:
        """Report ``student > source`` (``exact``: ``!=``) under ``label`` (``where``: the tensor or layer, if
        the label alone does not say it); True when it fits."""
        at = f" ({where})" if where else ""
        if exact and student != source:
            self.add(label, f"{label}: student {student} != source {source}{at}; it must equal the source's")
            return False
        if student > source:
            self.add(label, f"{label}: student {student} > source {source}{at}")
            return False
        return True

    def raise_if_any(self) -> None:
        if self.messages:
            raise InheritanceError(
                "manual inheritance takes leading slices, so the student must be no larger than its "
                f"source in any dimension and must match its tensors: {'; '.join(self.messages.values())}"
            )


# -- transformer towers: what to keep -----------------------------------------------------
_EMBED = "embed dim (embed_dim)"
_UNITS = {
    ("vision", "positions"): "vision token grid ((vision_cfg.image_size / patch_size)^2 + 1; a flattened 2D grid "
    "cannot be sliced)",
    ("text", "positions"): "context length (text_cfg.context_length)",
    ("text", "vocab"): "vocab size (text_cfg.vocab_size)",
}


def _labels(name: str) -> dict[str, str]:
    heads = "vision heads (vision_cfg.width / head_width)" if name == "vision" else "text heads (text_cfg.heads)"
    return {"layers": f"{name} layers ({name}_cfg.layers)", "width": f"{name} width ({name}_cfg.width)",
            "heads": heads, "mlp": f"{name} MLP width ({name}_cfg.mlp_ratio)"}


def tower_keep(student: Tower, source: Tower, choice: str, problems: _Problems) -> TowerKeep | None:
    """The leading units and the layers (``choice``) a student tower keeps of its source's, or None
    (with the problems reported) when the student is larger somewhere."""
    s, t, label = tower_structure(student), tower_structure(source), _labels(student.name)
    where = f"{student.name} tower"
    if student.prefix != source.prefix:
        problems.add(where, f"{where}: the student's tensors are under {student.prefix!r}, the source's under "
                            f"{source.prefix!r} (a CLIP and a CustomTextCLIP)")
        return None
    depth_ok = problems.larger(label["layers"], len(s["heads"]), len(t["heads"]), None)
    ok = problems.larger(label["width"], s["width"], t["width"], where) and depth_ok
    if any(s["heads"]) and s["head_dim"] != t["head_dim"]:
        problems.add(f"head dim {label['heads']}", f"head dim: student {s['head_dim']} != source {t['head_dim']} "
                     f"({where}); manual inheritance keeps whole heads, so head dims must be equal (vision: "
                     "head_width; text: width / heads)")
        ok = False
    own = dict(student.root.state_dict(prefix=student.prefix, keep_vars=True))
    theirs = dict(source.root.state_dict(prefix=source.prefix, keep_vars=True))
    units = {}
    for a in student.axis_params:
        n = own[a.key].shape[a.axis]
        if a.key not in theirs:
            problems.add(a.key, f"student tensor {a.key!r} has no source tensor")
            continue
        exact = (student.name, a.unit) == ("vision", "positions")
        ok &= problems.larger(_UNITS.get((student.name, a.unit), _EMBED), n, theirs[a.key].shape[a.axis],
                              f"{a.key}, axis {a.axis}", exact)
        units[a.unit] = torch.arange(n)
    layers = layer_indices(len(t["heads"]), len(s["heads"]), choice) if depth_ok else []
    for i, j in enumerate(layers):
        ok &= problems.larger(label["heads"], s["heads"][i], t["heads"][j], f"{where}, layer {i}")
        ok &= problems.larger(label["mlp"], s["mlp_width"][i], t["mlp_width"][j], f"{where}, layer {i}")
    if not ok:
        return None
    heads, neurons = [torch.arange(h) for h in s["heads"]], [torch.arange(f) for f in s["mlp_width"]]
    return TowerKeep(torch.arange(s["width"]), heads, neurons, layers=layers, units=units)


# -- ModifiedResNet: leading slices -------------------------------------------------------
_RW = "ResNet width (vision_cfg.width)"
_RF = "ResNet feature width (32 x vision_cfg.width)"
_GRID_RN = "attention-pool token grid ((vision_cfg.image_size / 32)^2 + 1; a flattened 2D grid cannot be sliced)"


def _resnet_label(name: str, axis: int) -> tuple[str, bool]:
    """(label, must be equal) of one axis of a ModifiedResNet tensor (``name`` without ``visual.``)."""
    if name.startswith("attnpool."):
        if name == "attnpool.positional_embedding":
            return (_GRID_RN, True) if axis == 0 else (_RF, False)
        return (_EMBED, False) if name.startswith("attnpool.c_proj") and axis == 0 else (_RF, False)
    return ("kernel size", True) if axis >= 2 else (_RW, False)


def _resnet_tensors(
    student: ModifiedResNet, source: ModifiedResNet, choice: str, problems: _Problems
) -> tuple[dict[str, Tensor], dict[str, list[int]]]:
    """``{visual.key: leading slice of its source tensor}`` of a ModifiedResNet and its stage layer maps."""
    maps: dict[str, list[int]] = {}
    for stage in range(1, 5):
        n, n_src = len(getattr(student, f"layer{stage}")), len(getattr(source, f"layer{stage}"))
        label = f"ResNet stage {stage} blocks (vision_cfg.layers[{stage - 1}])"
        if problems.larger(label, n, n_src, None):
            maps[f"vision.layer{stage}"] = layer_indices(n_src, n, choice)
    pools = student.attnpool, source.attnpool
    if isinstance(pools[0], AttentionPool2d) and isinstance(pools[1], AttentionPool2d):
        dims = [p.q_proj.out_features // p.num_heads for p in pools]
        if dims[0] != dims[1]:
            problems.add("attnpool head dim", f"attention-pool head dim: student {dims[0]} != source {dims[1]}")
        problems.larger("attention-pool heads (32 x vision_cfg.width / 64)", pools[0].num_heads, pools[1].num_heads,
                        "visual.attnpool")
    src_sd, out = source.state_dict(), {}
    for key, target in student.state_dict().items():
        stage, _, rest = key.partition(".")
        group = f"vision.{stage}"
        if group not in maps and stage.startswith("layer"):
            continue  # its depth was reported
        index, _, tail = rest.partition(".")
        source_tensor = src_sd.get(f"{stage}.{maps[group][int(index)]}.{tail}" if group in maps else key)
        if source_tensor is None or source_tensor.ndim != target.ndim:
            problems.add(key, f"no manual-inheritance rule for student tensor 'visual.{key}' (no source tensor)")
            continue
        fits = True
        for axis, (n, n_src) in enumerate(zip(target.shape, source_tensor.shape, strict=True)):
            label, exact = _resnet_label(key, axis)
            fits &= problems.larger(label, n, n_src, f"visual.{key}, axis {axis}", exact)
        if fits:
            out[f"visual.{key}"] = source_tensor.detach()[tuple(slice(0, n) for n in target.shape)]
    return out, maps


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


def _towers(model: nn.Module) -> dict[str, Tower]:
    found = {}
    for name in TOWERS:
        try:
            found[name] = get_tower(model, name, converted=False)
        except UnsupportedTower:
            continue
    return found


def inheritance_map(
    student: nn.Module, source: nn.Module, choices: Mapping[str, str] | None = None
) -> tuple[dict[str, Tensor], dict[str, list[int]]]:
    """The tensors manual inheritance copies into ``student`` (one per student key; the source is not
    changed) and the layer map. Every check of :func:`inherit_weights` (the dry run calls it on ``meta``
    models: shapes only). Raises :class:`InheritanceError` listing every problem."""
    require_clip(student, "student")
    require_clip(source, "source")
    kinds = type(student.visual).__name__, type(source.visual).__name__
    if kinds[0] != kinds[1]:
        raise InheritanceError(f"the student's image tower is a {kinds[0]} but the source's a {kinds[1]}")
    choices, problems = choices or {}, _Problems()
    towers, source_towers = _towers(student), _towers(source)
    keep, maps = {}, {}
    for name, tower in towers.items():  # depths first: a shallower source is the first thing to read
        if name in source_towers:
            problems.larger(_labels(name)["layers"], len(tower.blocks), len(source_towers[name].blocks), None)
    for name, tower in towers.items():
        if name not in source_towers:
            problems.add(name, f"the student has a {name} transformer tower but the source has none")
        elif (k := tower_keep(tower, source_towers[name], choices.get(name, "interval"), problems)) is not None:
            keep[name], maps[name] = k, list(k.layers)
    out: dict[str, Tensor] = {}
    if isinstance(student.visual, ModifiedResNet):
        out, resnet_maps = _resnet_tensors(student.visual, source.visual, choices.get("vision", "interval"), problems)
        maps.update(resnet_maps)
    problems.raise_if_any()
    state = select_state(source, keep, converted=False)[0]
    chosen = {key for name in keep for key, _ in towers[name].named_parameters()}
    for key, target in student.state_dict().items():
        if key in out or key.rsplit(".", 1)[-1] in OWN_TENSORS:
            continue
        tensor = state.get(key) if key in chosen else None
        if tensor is None:
            problems.add(key, f"no manual-inheritance rule for student tensor {key!r} (known: open_clip "
                              "VisionTransformer, text transformer, ModifiedResNet)")
        elif tensor.shape != target.shape:
            problems.add(key, f"{key}: student {tuple(target.shape)} != {tuple(tensor.shape)}, the source's tensor "
                              "at the student's units; it must equal the source's")
        else:
            out[key] = tensor
    problems.raise_if_any()
    return out, maps


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
