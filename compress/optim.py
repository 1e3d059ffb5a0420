"""Optimizer construction: AdamW with TinyCLIP's weight-decay groups."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def exclude_from_decay(name: str, param: nn.Parameter) -> bool:
    """open_clip / TinyCLIP rule: no weight decay on biases, norms, logit scale and 1-d tensors."""
    return (
        param.ndim < 2
        or "bn" in name
        or "ln" in name
        or "norm" in name
        or name.endswith(".bias")
        or "logit_scale" in name
    )


def weight_groups(
    modules: Iterable[tuple[str, nn.Module]], weight_decay: float, skip: set[int] | None = None
) -> list[dict[str, Any]]:
    """Two AdamW groups (decayed, not decayed) over the trainable parameters of ``modules``.

    ``modules`` are (prefix, module) pairs (the student, trainable loss heads such as
    projectors); ids in ``skip`` belong to a plug-in's own groups and are left out."""
    skip = skip or set()
    decay, no_decay, seen = [], [], set()
    for prefix, module in modules:
        for name, p in module.named_parameters(prefix=prefix):
            if not p.requires_grad or id(p) in skip or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if exclude_from_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"}]
    groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return [g for g in groups if g["params"]]


def build_adamw(
    groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], eps: float, fused: bool = False
) -> torch.optim.AdamW:
    """AdamW over the groups; every group remembers its own base lr as ``initial_lr``
    (plug-in groups such as mask logits keep their own lr, weights follow the lr schedule)."""
    for g in groups:
        g.setdefault("lr", lr)
        g.setdefault("follows_schedule", "name" in g and g["name"] in ("decay", "no_decay"))
        g["initial_lr"] = g["lr"]
    kwargs: dict[str, Any] = {"lr": lr, "betas": betas, "eps": eps}
    if fused:
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


def grad_norm(params: Iterable[nn.Parameter]) -> torch.Tensor:
    """The L2 norm of all gradients together, ||(g_1, ..., g_n)||_2, in float32 (0 without gradients);
    ``clip_grad_norm_``'s total norm without clipping, for any torch version."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]
    devices = {n.device for n in norms}
    device = norms[0].device if len(devices) == 1 else torch.device("cpu")
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
