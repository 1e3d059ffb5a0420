"""A test plug-in: one-shot magnitude pruning to a target sparsity, in its own file, with no engine edit.

It proves the inheritance contract of :mod:`compress.plugins` (issue 17): the engine learns that it prunes to a
target, and through which parameter (``sparsity``, deliberately not ``target_sparsity``), from its declared
``target_parameter``; its plan text from :meth:`describe_student`; a resumed run rebuilds its (already smaller)
student from the checkpoint's structure alone (the default :meth:`restore`).

Importance: the RMS of a unit's weights (Han et al., "Learning both Weights and Connections", NeurIPS 2015, by
unit instead of by weight; Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017, for L2-ranked
structures). A head's weights are its q, k, v rows and its out_proj columns; an MLP neuron's its c_fc row and
c_proj column. Units are dropped from the lowest RMS up, a unit only while what is removed stays within the
target (so a head too large for what is left is skipped and neurons fill the rest: the result is below the
target by less than one MLP neuron's parameters); every layer keeps at least one head and one neuron.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from compress.models.params import prunable_count
from compress.models.structure import TowerKeep, describe_structure, prune_model
from compress.models.towers import get_tower, resolve_towers
from compress.plugins import Inheritance


class MagnitudeInheritance(Inheritance):
    """Magnitude pruning: keep the heads and MLP neurons of largest weight RMS, removing ``sparsity`` of the source."""

    needs_student_config = False
    target_parameter = "sparsity"

    def __init__(self, sparsity: float = 0.5, towers: str = "both") -> None:
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        self.sparsity = float(sparsity)
        self.towers = resolve_towers(towers)

    def describe_student(self, source: str) -> str:
        return f"{source} pruned once by weight magnitude (the heads and MLP neurons of largest weight RMS kept)"

    @torch.no_grad()
    def inherit(self, student: nn.Module | None, source: nn.Module) -> nn.Module:
        model = copy.deepcopy(source).requires_grad_(True)
        structure = describe_structure(model)
        units = [unit for name in self.towers for unit in _units(model, name, structure[name])]
        needed = self.sparsity * prunable_count(model, self.towers)
        removed, dropped = 0, set()
        left = {(tower, kind, layer): count for tower, kind, layer, count in _layer_counts(structure, self.towers)}
        for _score, cost, key in sorted(units, key=lambda u: u[0]):
            tower, kind, layer, _ = key
            if removed + cost > needed or left[tower, kind, layer] <= 1:
                continue
            dropped.add(key)
            removed += cost
            left[tower, kind, layer] -= 1
        keep = {name: _keep(structure[name], name, dropped) for name in structure}
        return prune_model(model, keep)


def _layer_counts(structure: dict, towers: tuple[str, ...]):
    for name in towers:
        for i, (heads, neurons) in enumerate(zip(structure[name]["heads"], structure[name]["mlp_width"], strict=True)):
            yield name, "head", i, heads
            yield name, "neuron", i, neurons


def _rms(rows: Tensor) -> Tensor:
    """RMS of each unit's weights (one unit per row)."""
    return rows.float().pow(2).mean(dim=1).sqrt()


def _units(model: nn.Module, name: str, tower: dict) -> list[tuple[float, int, tuple[str, str, int, int]]]:
    """(score, parameters, (tower, kind, layer, index)) of every head and MLP neuron of a tower."""
    state = model.state_dict()
    prefix = get_tower(model, name).blocks_prefix
    width, head_dim = tower["width"], tower["head_dim"]
    out = []
    for i, (heads, neurons) in enumerate(zip(tower["heads"], tower["mlp_width"], strict=True)):
        p = f"{prefix}{i}."
        if heads:
            qkv = state[f"{p}attn.in_proj_weight"].view(3, heads, head_dim, width).permute(1, 0, 2, 3)
            proj = state[f"{p}attn.out_proj.weight"].view(width, heads, head_dim).permute(1, 0, 2)
            scores = _rms(torch.cat([qkv.reshape(heads, -1), proj.reshape(heads, -1)], dim=1))
            cost = 4 * head_dim * width + 3 * head_dim
            out += [(float(s), cost, (name, "head", i, h)) for h, s in enumerate(scores)]
        if neurons:
            rows = torch.cat([state[f"{p}mlp.c_fc.weight"], state[f"{p}mlp.c_proj.weight"].T], dim=1)
            out += [(float(s), 2 * width + 1, (name, "neuron", i, n)) for n, s in enumerate(_rms(rows))]
    return out


def _keep(tower: dict, name: str, dropped: set) -> TowerKeep:
    def kept(kind: str, layer: int, count: int) -> Tensor:
        return torch.tensor([u for u in range(count) if (name, kind, layer, u) not in dropped], dtype=torch.long)

    return TowerKeep(
        channels=torch.arange(tower["width"]),
        heads=[kept("head", i, h) for i, h in enumerate(tower["heads"])],
        neurons=[kept("neuron", i, m) for i, m in enumerate(tower["mlp_width"])],
    )
