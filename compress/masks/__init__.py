"""Learnable structured masks (hard-concrete L0 gates) for automatic weight inheritance.

gates (the distribution), modules (gated linear, masked LayerNorm), attach (put masks on a
converted CLIP), budget (expected kept size), lagrangian (the sparsity constraint), prune
(fold the masks and make the model physically smaller).
"""

from compress.masks.attach import ClipMasks, TowerMasks, attach_masks, detach_masks, get_masks, one_gate_sample
from compress.masks.budget import TowerCosts, count_prunable, sparsity
from compress.masks.gates import HardConcreteGates, deterministic_gates, keep_probability, sample_gates
from compress.masks.lagrangian import SparsityLagrangian
from compress.masks.prune import deterministic_keep, fold_masks, prune_masked

__all__ = [
    "ClipMasks",
    "HardConcreteGates",
    "SparsityLagrangian",
    "TowerCosts",
    "TowerMasks",
    "attach_masks",
    "count_prunable",
    "detach_masks",
    "deterministic_gates",
    "deterministic_keep",
    "fold_masks",
    "get_masks",
    "keep_probability",
    "one_gate_sample",
    "prune_masked",
    "sample_gates",
    "sparsity",
]
