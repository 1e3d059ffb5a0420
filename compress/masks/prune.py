"""From a masked model to the physically smaller one: fold the deterministic masks into the
weights, take the masks off, keep the units whose mask is non-zero.

As CoFi's ``prune_model_with_z`` and TinyCLIP's ``prune()``: the kept mask values (soft,
sigmoid(0.8 log_alpha / beta), not 1) are multiplied into the weights they gate: the head and
neuron values into the input columns of ``out_proj`` / ``c_proj``, the channel (x layer) values
into their output rows and biases and into the embeddings. The pruned model then computes
exactly what the masked model computes in eval mode.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from compress.masks.attach import ClipMasks, TowerMasks, detach_masks, get_masks
from compress.models.structure import TowerKeep, prune_model
from compress.models.towers import get_tower


def _nonzero(values: Tensor) -> Tensor:
    return torch.nonzero(values, as_tuple=True)[0]


def deterministic_keep(masks: TowerMasks) -> TowerKeep:
    """Kept indices under the deterministic masks (a head or neuron whose layer gate is 0 is dropped)."""
    heads = list(masks.heads.split(masks.heads.deterministic()))
    neurons = list(masks.neurons.split(masks.neurons.deterministic()))
    if masks.attn_layers is not None:
        heads = [h * g for h, g in zip(heads, masks.attn_layers.deterministic(), strict=True)]
    if masks.mlp_layers is not None:
        neurons = [n * g for n, g in zip(neurons, masks.mlp_layers.deterministic(), strict=True)]
    return TowerKeep(
        channels=_nonzero(masks.channels.deterministic()),
        heads=[_nonzero(h) for h in heads],
        neurons=[_nonzero(n) for n in neurons],
    )


@torch.no_grad()
def fold_masks(model: nn.Module) -> dict[str, TowerKeep]:
    """Multiply the deterministic mask values into ``model``'s weights (in place); returns the
    kept indices of every masked tower. The masks stay attached (their effect is now doubled
    until :func:`~compress.masks.attach.detach_masks`)."""
    masks: ClipMasks | None = get_masks(model)
    if masks is None:
        raise ValueError("the model carries no structured masks")
    keep = {}
    was_training = masks.training
    masks.eval()
    try:
        for name, tower_masks in masks.towers.items():
            channels = tower_masks.refresh()  # deterministic gates written to the modules
            for linear in (*tower_masks._out_projs, *tower_masks._c_projs):
                weight, bias = linear.gated_weight_and_bias()
                linear.weight.copy_(weight)
                if bias is not None:
                    linear.bias.copy_(bias)
            params = dict(get_tower(model, name).named_parameters())
            for p in get_tower(model, name).channel_params:
                if p.fold:
                    shape = [1] * params[p.key].ndim
                    shape[p.axis] = -1
                    params[p.key].mul_(channels.view(shape).to(params[p.key].dtype))
            keep[name] = deterministic_keep(tower_masks)
    finally:
        masks.clear()
        masks.train(was_training)
    return keep


def prune_masked(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The physically pruned model of a masked ``model`` (a copy unless ``inplace``): per-layer
    head counts and MLP widths, a smaller residual width, no masks. It carries
    ``clip_structure`` and is exactly the masked model in eval mode."""
    masks = get_masks(model)
    if masks is None:
        raise ValueError("the model carries no structured masks")
    masks.clear()
    target = model if inplace else copy.deepcopy(model)
    keep = fold_masks(target)
    detach_masks(target)
    return prune_model(target, keep)
