"""Multi-head attention with a plain qkv projection whose head count and inner size are free.

open_clip's blocks hold ``nn.MultiheadAttention``, whose inner size must equal the width
and whose heads cannot be removed one by one. :class:`HeadAttention` keeps the same
parameter names (``in_proj_weight`` [3 * H * d_h, D], ``in_proj_bias``, ``out_proj``), so
a uniform model's state dict is still an open_clip state dict, but ``H * d_h`` may differ
from ``D`` and ``H`` may be zero (a layer that lost all its heads adds only the output bias).
Learnable head masks gate the input columns of ``out_proj`` (:mod:`compress.masks.modules`).
"""

from __future__ import annotations

import warnings
import weakref

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


class HeadAttention(nn.Module):
    """Self-attention ``out_proj(concat_h softmax(q_h k_h^T / sqrt(d_h)) v_h)`` (Vaswani et al.)."""

    #: set by :func:`mark_causal_mask`: the [L, L] ``attn_mask`` this module is given is the causal one
    causal_mask: bool = False

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
        with warnings.catch_warnings():  # nn.Linear(0, D) warns that initialising nothing is a no-op
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            self.out_proj = nn.Linear(inner, embed_dim, bias=bias)
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
        key_padding_mask: Tensor | None = None,
        need_weights: bool = False,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, None]:
        """Same call signature and mask semantics as ``nn.MultiheadAttention`` (self-attention only).

        ``attn_mask``: [L, L] or [N * H, L, L]; boolean ``True`` or float ``-inf`` masks a position.
        ``key_padding_mask``: [N, L]; boolean ``True`` ignores that key. Attention weights are
        never returned (the second output is ``None``)."""
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise NotImplementedError("HeadAttention implements self-attention only")
        if need_weights:
            raise NotImplementedError("HeadAttention does not return attention weights")
        unbatched = query.dim() == 2
        x = query.unsqueeze(0) if unbatched else query if self.batch_first else query.transpose(0, 1)
        if self.num_heads == 0:
            bias = self.out_proj.bias if self.out_proj.bias is not None else x.new_zeros(self.embed_dim)
            # a new tensor, not a view of the parameter: under no_grad such a view still says
            # requires_grad (without a grad_fn), which trips autograd hooks (FLOP counting)
            out = x.new_zeros(x.shape) + bias.to(x.dtype)
        elif key_padding_mask is None and (attn_mask is None and is_causal or self._causal(attn_mask, x.shape[1])):
            out = self._attend(x, None, causal=True)  # SDPA's is_causal: flash / memory-efficient kernels allowed
        else:
            mask = self._merge_masks(x, attn_mask, key_padding_mask, is_causal)
            out = self._attend(x, mask)
        if unbatched:
            return out.squeeze(0), None
        return (out if self.batch_first else out.transpose(0, 1)), None

    def _causal(self, mask: Tensor | None, n: int) -> bool:
        """Whether ``mask`` is the causal mask of length ``n``: known without a look at its values where
        :func:`mark_causal_mask` found the tower's mask causal (under ``torch.compile`` no look is taken)."""
        if self.causal_mask and mask is not None and mask.dim() == 2 and tuple(mask.shape) == (n, n):
            return True
        return is_causal_mask(mask, n)

    def _attend(self, x: Tensor, mask: Tensor | None, causal: bool = False) -> Tensor:
        """``out_proj(concat_h softmax(q_h k_h^T / sqrt(d_h) + mask) v_h)``; x is [N, L, D]; ``causal``:
        the mask is the causal one, given to SDPA as ``is_causal`` (no mask tensor)."""
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = rearrange(qkv, "b n (qkv h d) -> qkv b h n d", qkv=3, h=self.num_heads, d=self.head_dim)
        heads = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.out_proj(rearrange(heads, "b h n d -> b n (h d)"))

    def _merge_masks(
        self, x: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None, is_causal: bool
    ) -> Tensor | None:
        """One additive float mask broadcastable to [N, H, L, L] (``nn.MultiheadAttention``'s
        boolean convention, ``True`` = masked, is the opposite of SDPA's, so booleans become
        ``-inf``)."""
        b, n, _ = x.shape
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
        mask = _additive(attn_mask, x.dtype)
        if mask is not None and mask.dim() == 3:
            mask = mask.view(b, self.num_heads, n, n)
        padding = _additive(key_padding_mask, x.dtype)
        if padding is not None:
            padding = padding.view(b, 1, 1, n)
            mask = padding if mask is None else mask + padding
        return mask

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


#: id(mask) -> (a weak reference to it, its version counter, whether it is the causal mask)
_CAUSAL_MEMO: dict[int, tuple[weakref.ref, int, bool]] = {}


def is_causal_mask(mask: Tensor | None, n: int) -> bool:
    """Whether ``mask`` is exactly the causal mask of length ``n`` (open_clip's text tower: float [n, n],
    -inf strictly above the diagonal and 0 elsewhere; or boolean, True above it), so that SDPA can be
    told ``is_causal`` instead of being handed the tensor, which rules out its flash kernels.

    The answer needs a look at the values (a host sync), so it is computed once per mask tensor and
    remembered while that tensor lives and is not modified in place (its version counter); the text
    tower passes the same buffer to every block on every call. Under ``torch.compile`` the look is not
    taken (a graph break per block would cost more) and the mask is used as given."""
    if mask is None or mask.dim() != 2 or tuple(mask.shape) != (n, n) or torch.compiler.is_compiling():
        return False
    memo = _CAUSAL_MEMO.get(id(mask))
    if memo is not None and memo[0]() is mask and memo[1] == mask._version:
        return memo[2]
    above = torch.ones(n, n, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:
        causal = bool(torch.equal(mask, above))
    else:
        causal = bool(torch.equal(mask, torch.zeros_like(mask).masked_fill(above, float("-inf"))))
    for key in [k for k, (ref, _, _) in _CAUSAL_MEMO.items() if ref() is None]:
        del _CAUSAL_MEMO[key]
    _CAUSAL_MEMO[id(mask)] = (weakref.ref(mask), mask._version, causal)
    return causal


def mark_causal_mask(transformer: nn.Module, mask: Tensor | None) -> bool:
    """Tell the :class:`HeadAttention` modules of ``transformer`` whether the [L, L] mask they are given
    (``mask``, the tower's buffer, or its top-left corner) is the causal one, looked at here once: compiled,
    they cannot look at it (:func:`is_causal_mask`) and would hand SDPA the tensor instead of ``is_causal``.
    Returns whether it is causal."""
    causal = mask is not None and mask.dim() == 2 and is_causal_mask(mask, mask.shape[0])
    for module in transformer.modules():
        if isinstance(module, HeadAttention):
            module.causal_mask = causal
    return causal


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (``True`` = masked) as a float mask of 0 / -inf; a float mask as ``dtype``."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _self_attention_children(model: nn.Module) -> list[tuple[nn.Module, str, nn.MultiheadAttention]]:
    """``(parent, name, mha)`` for every ``nn.MultiheadAttention`` used as self-attention.

    Cross-attention (CoCa's ``AttentionalPooler``, blocks built with ``is_cross_attention``)
    is left alone: its keys are not its queries."""
    found = []
    for parent in model.modules():
        if type(parent).__name__ == "AttentionalPooler" or hasattr(parent, "ln_1_kv"):
            continue
        for child_name, child in parent.named_children():
            if isinstance(child, nn.MultiheadAttention):
                found.append((parent, child_name, child))
    return found


def convert_attention(model: nn.Module) -> nn.Module:
    """Replace every self-attention ``nn.MultiheadAttention`` in ``model`` by an exact
    :class:`HeadAttention` (in place; returns ``model``). Idempotent; state dict keys unchanged."""
    for parent, child_name, child in _self_attention_children(model):
        setattr(parent, child_name, HeadAttention.from_multihead(child))
    return model


def is_converted(model: nn.Module) -> bool:
    """Whether no self-attention ``nn.MultiheadAttention`` is left in ``model``."""
    return not _self_attention_children(model)
