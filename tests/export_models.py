"""Students for the export tests: a uniform one and an automatically pruned (non-uniform) one, both tiny."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from compress.masks import attach_masks, prune_masked
from compress.models import load_model

LOW = math.log(0.01)


def uniform_student() -> nn.Module:
    """``cc-test-student`` (random weights): every layer alike, open_clip's own layout."""
    torch.manual_seed(0)
    return load_model("cc-test-student")


def random_masks(model: nn.Module, layer_gates: bool, keep_channels: bool = False) -> nn.Module:
    """Attach learnable masks to ``model`` (in place) with random logits in [ln 0.01, ln 100]: vision layer 1
    loses every head; with ``layer_gates`` vision layer 2 its whole MLP and text layer 0 its attention block;
    ``keep_channels`` keeps every residual channel. Returns ``model`` in eval mode."""
    masks = attach_masks(model, layer_gates=layer_gates)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for tower in masks.towers.values():
            for gates in tower.gate_modules():
                gates.log_alpha.uniform_(LOW, -LOW, generator=generator)
            if keep_channels:
                tower.channels.log_alpha.fill_(-LOW)
            if layer_gates:
                tower.attn_layers.log_alpha.fill_(-LOW)
                tower.mlp_layers.log_alpha.fill_(-LOW)
        vision, text = masks.towers["vision"], masks.towers["text"]
        vision.heads.log_alpha[4:8] = LOW
        if layer_gates:
            vision.mlp_layers.log_alpha[2] = LOW
            text.attn_layers.log_alpha[0] = LOW
    return model.eval()


def pruned_student(layer_gates: bool = True, keep_channels: bool = False) -> nn.Module:
    """``cc-test-teacher`` pruned as the ``auto`` inheritance prunes at its prune step (learnable masks folded
    into a physically smaller model, :func:`compress.masks.prune_masked`), the masks drawn by
    :func:`random_masks`; ``keep_channels`` keeps the residual width (else some channels go too, and no
    uniform open_clip model computes the same function)."""
    torch.manual_seed(0)
    return prune_masked(random_masks(copy.deepcopy(load_model("cc-test-teacher")), layer_gates, keep_channels))
