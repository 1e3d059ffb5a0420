"""Module swaps that let a tower run under structured masks, with unchanged state-dict keys.

- :class:`GatedLinear` (``attn.out_proj``, ``mlp.c_proj``): y = x (W * g_out g_in^T)^T + b * g_out.
  The input gate g_in is the head gate (repeated over the head dim) or the MLP neuron gate,
  the output gate the residual-channel gate (times an optional layer gate). Gating the
  weight is the same as gating the activations (z_h * head_h before the projection; the
  MLP hidden units after the activation; the block output added to the residual) but costs
  a [D, F] product instead of a [tokens, F] one, and it is literally the fold that pruning
  does, which keeps the masked and the pruned model exactly alike.
- :class:`MaskedLayerNorm`: LayerNorm over the kept channels only (CoFi, TinyCLIP): mean and
  variance over the channels whose current channel gate is non-zero (the sampled gate in
  training, the deterministic one in evaluation), output 0 on the others.

Gate tensors are transient attributes: never saved, dropped by ``copy.deepcopy``/pickle.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _Transient:
    """Attributes named in ``_transient`` are set to None in copies and pickles."""

    _transient: tuple[str, ...] = ()

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), **dict.fromkeys(self._transient)}  # type: ignore[misc]


class GatedLinear(_Transient, nn.Linear):
    """``nn.Linear`` whose weight is gated per output row and input column (shares the Parameters)."""

    _transient = ("row_gate", "col_gate")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kwargs) -> None:
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        self.row_gate: Tensor | None = None
        self.col_gate: Tensor | None = None

    @classmethod
    def wrap(cls, linear: nn.Linear) -> GatedLinear:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a layer without heads has a zero-element weight
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        return new

    def unwrap(self) -> nn.Linear:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight, plain.bias = self.weight, self.bias
        return plain

    def gated_weight_and_bias(self) -> tuple[Tensor, Tensor | None]:
        """(W * g_out g_in^T, b * g_out)."""
        weight, bias = self.weight, self.bias
        if self.col_gate is not None:
            weight = weight * self.col_gate.to(weight.dtype)
        if self.row_gate is not None:
            row = self.row_gate.to(weight.dtype)
            weight = weight * row.unsqueeze(1)
            bias = bias * row if bias is not None else None
        return weight, bias

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.gated_weight_and_bias()
        return F.linear(x, weight, bias)


def masked_layer_norm(x: Tensor, keep: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """LayerNorm over the n channels where ``keep`` is 1, 0 on the others, in (at least) float32:
    mu = sum_k x_k / n, var = sum_k (x_k - mu)^2 / n, y_k = (x_k - mu) / sqrt(var + eps) w_k + b_k.

    Computed with one fused ``F.layer_norm`` over all D channels: the dropped channels are filled
    with mu (so mean and variance over D are mu and var n / D) and the input is scaled by
    a = sqrt(D / n), which turns var n / D + eps / a^2 into (var + eps) n / D; the weight w sqrt(n / D)
    undoes the scale. No host synchronisation (n stays a tensor)."""
    dtype, width = x.dtype, x.shape[-1]
    compute = torch.promote_types(dtype, torch.float32)
    x, keep = x.to(compute), keep.to(compute)
    n = keep.sum().clamp_min(1.0)
    mean = (x @ keep).unsqueeze(-1) / n
    scale = torch.sqrt(width / n)
    filled = torch.where(keep.bool(), x, mean) * scale
    w = keep / scale if weight is None else weight.to(compute) * keep / scale
    b = None if bias is None else bias.to(compute) * keep
    return F.layer_norm(filled, (width,), w, b, eps).to(dtype)


class MaskedLayerNorm(_Transient, nn.LayerNorm):
    """LayerNorm over the kept residual channels (``keep`` [D] of 0/1, set per forward);
    the wrapped LayerNorm class's own forward while ``keep`` is None."""

    _transient = ("keep",)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.keep: Tensor | None = None
        self.original_class: type[nn.LayerNorm] = nn.LayerNorm

    @classmethod
    def wrap(cls, norm: nn.LayerNorm) -> MaskedLayerNorm:
        new = cls(norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.elementwise_affine,
                  bias=norm.bias is not None, device="meta")
        new.weight, new.bias = norm.weight, norm.bias
        new.original_class = type(norm)
        return new

    def unwrap(self) -> nn.LayerNorm:
        plain = self.original_class(self.normalized_shape, eps=self.eps, elementwise_affine=self.elementwise_affine,
                                    bias=self.bias is not None, device="meta")
        plain.weight, plain.bias = self.weight, self.bias
        return plain

    def forward(self, x: Tensor) -> Tensor:
        if self.keep is None:
            return self.original_class.forward(self, x)
        return masked_layer_norm(x, self.keep, self.weight, self.bias, self.eps)
