"""The sparsity Lagrangian that drives the expected sparsity p of the masks to a target q.

- ``two_sided`` (TinyCLIP paper, CoFi, Xia et al. 2022): lambda1 (p - q) + lambda2 (p - q)^2;
- ``one_sided`` (TinyCLIP's official code): lambda1 max(q - p, 0) + lambda2 max(q - p, 0)^2.

The mask logits minimise it with the distillation loss; lambda1 and lambda2 maximise it
(gradient ascent: an optimizer group with ``maximize=True``), so a penalty that stays unmet
keeps growing. Initial lambdas: 10 for ``one_sided`` (TinyCLIP's code). For ``two_sided`` the
default is 0 (CoFi): the gradient w.r.t. p is lambda1 + 2 lambda2 (p - q), so a positive
lambda1 of 10 would push towards *less* sparsity until ascent had driven it below 2 lambda2 (q - p).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

MODES = ("two_sided", "one_sided")
DEFAULT_LAMBDA = {"two_sided": 0.0, "one_sided": 10.0}


class SparsityLagrangian(nn.Module):
    """``forward(p, q)``: the Lagrangian term (a scalar tensor) for expected sparsity p, target q."""

    def __init__(self, mode: str = "two_sided", lambda_init: float | None = None) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"lagrangian must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        init = DEFAULT_LAMBDA[mode] if lambda_init is None else float(lambda_init)
        self.lambda_1 = nn.Parameter(torch.tensor(init))
        self.lambda_2 = nn.Parameter(torch.tensor(init))

    def forward(self, expected_sparsity: Tensor, target: float) -> Tensor:
        p = expected_sparsity.to(self.lambda_1.dtype)
        gap = p - target if self.mode == "two_sided" else (target - p).clamp_min(0.0)
        return self.lambda_1 * gap + self.lambda_2 * gap.square()

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"
