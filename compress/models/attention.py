"""Multi-head attention with a plain qkv projection whose head count and inner size are free.

open_clip's blocks hold ``nn.MultiheadAttention``, whose inner size must equal the width
and whose heads cannot be removed one by one. :class:`HeadAttention` keeps the same
parameter names (``in_proj_weight`` [3 * H * d_h, D], ``in_proj_bias``, ``out_proj``), so
a uniform model's state dict is still an open_clip state dict, but ``H * d_h`` may differ
from ``D`` and ``H`` may be zero (a layer that lost all its heads adds only the output bias).

An optional ``head_gate`` (shape [H], set by mask strategies) scales each head's output
before the output projection: z_h * softmax(q_h k_h^T / sqrt(d_h)) v_h.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class HeadAttention(nn.Module):
    """Self-attention ``out_proj(concat_h softmax(q_h k_h^T / sqrt(d_h)) v_h)`` (Vaswani et al.)."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        batch_first: bool = True,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.batch_first = batch_first
        inner = num_heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner)) if bias else None
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)
        self.head_gate: Tensor | None = None
        if inner:
            nn.init.xavier_uniform_(self.in_proj_weight)

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        need_weights: bool = False,
        attn_mask: Tensor | None = None,
    ) -> tuple[Tensor, None]:
        """Same call signature as ``nn.MultiheadAttention`` as open_clip uses it (self-attention)."""
        if key is not None and key is not query or value is not None and value is not query:
            raise NotImplementedError("HeadAttention implements self-attention only")
        x = query if self.batch_first else query.transpose(0, 1)
        if self.num_heads == 0:
            out = self.out_proj.bias if self.out_proj.bias is not None else x.new_zeros(self.embed_dim)
            out = out.to(x.dtype).expand_as(x)
        else:
            b, n, _ = x.shape
            qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
            qkv = qkv.view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            if attn_mask is not None and attn_mask.dtype != torch.bool:
                attn_mask = attn_mask.to(x.dtype)
            heads = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)
            if self.head_gate is not None:
                heads = heads * self.head_gate.to(heads.dtype).view(1, -1, 1, 1)
            out = self.out_proj(heads.transpose(1, 2).reshape(b, n, self.inner_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None

    @classmethod
    def from_multihead(cls, mha: nn.MultiheadAttention) -> HeadAttention:
        """An exact copy of an ``nn.MultiheadAttention`` (packed qkv, self-attention)."""
        if not mha._qkv_same_embed_dim:
            raise ValueError("only packed-qkv nn.MultiheadAttention (kdim == vdim == embed_dim) is supported")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("nn.MultiheadAttention with add_bias_kv / add_zero_attn is not supported")
        new = cls(
            mha.embed_dim,
            mha.num_heads,
            mha.head_dim,
            batch_first=mha.batch_first,
            bias=mha.in_proj_bias is not None,
        )
        new.to(device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        with torch.no_grad():
            new.in_proj_weight.copy_(mha.in_proj_weight)
            if mha.in_proj_bias is not None:
                new.in_proj_bias.copy_(mha.in_proj_bias)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}"


def convert_attention(model: nn.Module) -> nn.Module:
    """Replace every ``nn.MultiheadAttention`` in ``model`` by an exact :class:`HeadAttention`
    (in place; returns ``model``). Idempotent."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.MultiheadAttention):
                setattr(parent, child_name, HeadAttention.from_multihead(child))
    return model


def is_converted(model: nn.Module) -> bool:
    return not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
