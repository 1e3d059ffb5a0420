"""Expected number of kept prunable parameters, a differentiable function of keep probabilities.

CoFi (Xia et al., ACL 2022) / TinyCLIP (Wu et al., ICCV 2023): with keep probabilities
r_c (residual channels), p_lh (heads of layer l), q_lj (MLP neurons of layer l) and optional
layer gates a_l, m_l, the expected kept size of a tower is

    E[size] = const + C_io * sum_c r_c
              + sum_l [ A_l (sum_c r_c)(a_l sum_h p_lh) + B_l a_l sum_h p_lh
                      + M_l (sum_c r_c)(m_l sum_j q_lj) + N_l m_l sum_j q_lj + R_l sum_c r_c ]

where every cost is read from the module shapes: A_l = (|in_proj_weight| + |out_proj.weight|)
/ (H_l D) per (channel, head) pair, B_l = |in_proj_bias| / H_l per head, M_l = (|c_fc.weight|
+ |c_proj.weight|) / (F_l D) per (channel, neuron) pair, N_l = |c_fc.bias| / F_l per neuron,
R_l = the block's per-channel tensors (norms, output biases, layer scales) / D, C_io = the
tower-level tensors with a channel axis / D (embeddings, final norm, projection; the text token
embedding is not counted, see :mod:`compress.models.towers`). The sum over (channel, unit)
pairs factorises: sum_{c,h} r_c p_h = (sum_c r_c)(sum_h p_h). With 0/1 keep probabilities the
formula is the exact parameter count of the pruned model (:func:`count_prunable`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from compress.models.towers import Tower, UnsupportedTower, get_tower

_PAIR_HEAD = ("attn.in_proj_weight", "attn.out_proj.weight")
_HEAD = ("attn.in_proj_bias",)
_PAIR_NEURON = ("mlp.c_fc.weight", "mlp.c_proj.weight")
_NEURON = ("mlp.c_fc.bias",)


def _per(numel: int, units: int) -> float:
    return numel / units if units else 0.0


class TowerCosts(nn.Module):
    """Parameter costs of one tower (see the module docstring), read from its module shapes."""

    def __init__(self, tower: Tower) -> None:
        super().__init__()
        width = tower.width
        counted_io = {p.key for p in tower.channel_params if p.counted}
        skipped = {p.key for p in tower.channel_params if not p.counted}
        self.constant = 0.0
        self.per_channel = 0.0
        #: the size with every unit kept: the tower's prunable parameter count
        self.full = float(sum(p.numel() for k, p in tower.named_parameters() if k not in skipped))
        for key, param in tower.named_parameters():
            if key.startswith(tower.blocks_prefix) or key in skipped:
                continue
            if key in counted_io:
                self.per_channel += param.numel() / width
            else:
                self.constant += param.numel()
        columns: dict[str, list[float]] = {k: [] for k in ("pair_head", "head", "pair_neuron", "neuron", "channel")}
        for i, block in enumerate(tower.blocks):
            heads, neurons = block.attn.num_heads, block.mlp.c_fc.out_features
            sizes = dict.fromkeys(columns, 0)
            for name, p in block.named_parameters():
                if name in _PAIR_HEAD:
                    sizes["pair_head"] += p.numel()
                elif name in _HEAD:
                    sizes["head"] += p.numel()
                elif name in _PAIR_NEURON:
                    sizes["pair_neuron"] += p.numel()
                elif name in _NEURON:
                    sizes["neuron"] += p.numel()
                elif p.shape == (width,):
                    sizes["channel"] += p.numel()
                else:
                    raise UnsupportedTower(f"{tower.name} block {i}: no cost rule for {name} {tuple(p.shape)}")
            columns["pair_head"].append(_per(sizes["pair_head"], heads * width))
            columns["head"].append(_per(sizes["head"], heads))
            columns["pair_neuron"].append(_per(sizes["pair_neuron"], neurons * width))
            columns["neuron"].append(_per(sizes["neuron"], neurons))
            columns["channel"].append(_per(sizes["channel"], width))
        for name, values in columns.items():
            self.register_buffer(name, torch.tensor(values, dtype=torch.float64), persistent=False)

    def forward(
        self,
        channels: Tensor,
        head_sums: Tensor,
        neuron_sums: Tensor,
    ) -> Tensor:
        """Expected kept size from sum_c r_c (via ``channels`` [D]) and the per-layer sums
        a_l sum_h p_lh (``head_sums`` [L]) and m_l sum_j q_lj (``neuron_sums`` [L])."""
        r = channels.double().sum()
        h, n = head_sums.double(), neuron_sums.double()
        per_layer = (self.pair_head * h + self.pair_neuron * n + self.channel) * r + self.head * h + self.neuron * n
        return self.constant + self.per_channel * r + per_layer.sum()


def count_prunable(model: nn.Module, towers: Iterable[str] = ("vision", "text")) -> int:
    """Exact number of prunable parameters of ``model``'s towers (every tower parameter but the
    text token embedding): equal to parameter_report's vision + text counts."""
    total = 0
    for name in towers:
        tower = get_tower(model, name)
        params = dict(tower.named_parameters())
        total += sum(params[k].numel() for k in tower.counted_keys())
    return total


def sparsity(kept: Mapping[str, Tensor], full: Mapping[str, float], pooled: bool) -> dict[str, Tensor]:
    """Expected sparsity 1 - E[size] / full per tower, and pooled over towers under ``"all"``."""
    out = {name: 1.0 - kept[name] / full[name] for name in kept}
    if pooled:
        out["all"] = 1.0 - sum(kept.values()) / sum(full[name] for name in kept)
    return out
