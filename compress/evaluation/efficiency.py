"""Efficiency: multiply-accumulates (MACs) per sample and throughput of a CLIP model.

MACs are counted for one image (``encode_image`` on [1, 3, H, W]) and one text
(``encode_text`` on [1, L]) separately, as TinyCLIP reports them (ViT-B/32 at 224:
4.4G image, 2.9G text). Two counters:

- ``"aten"`` (default): PyTorch's ``FlopCounterMode`` sees every matmul and convolution at
  the ATen level, whatever module issues it (``F.linear``, ``x @ proj``, the projections of
  ``F.multi_head_attention_forward`` in ModifiedResNet's attention pool); MACs = FLOPs / 2.
  Attention is counted analytically, independent of the torch version and of the SDPA
  backend: whichever fused kernel ``F.scaled_dot_product_attention`` dispatches to (torch
  2.14's CPU flash kernel has no formula of its own) counts Q·Kᵀ and A·V, L·S·(d_h + d_v)
  MACs per batch row and head, the same as the math backend's two ``bmm``; an attention
  kernel without a formula raises instead of counting 0. Bias adds, norms, softmax and
  activations are not counted: the fvcore / TinyCLIP convention.
- ``"torch_pruning"``: ``tp.utils.count_ops_and_params``, a module-hook counter (ptflops)
  that adds elementwise ops (LayerNorm 2/element, GELU 1/element, softmax, q scaling, one
  bias per output feature) and only sees registered module types. It does not see
  :class:`HeadAttention` (its ``F.linear`` qkv projection and SDPA), so a hook is added that
  applies torch-pruning's own ``nn.MultiheadAttention`` formula with inner size I = H * d_h:
  L*I (q scaling) + 3*L*D*I (qkv) + 3*L*I (qkv bias) + H*(2*L*L*d_h + L*L) (scores, softmax,
  weighted sum) + L*I*D + L*D (output projection and bias), per sample. A converted model
  then counts exactly as the unconverted open_clip one. It still misses functional ops
  (the final ``x @ proj`` projections, ModifiedResNet's attention pool).

Throughput (TinyCLIP): images/s and texts/s of the two encoders measured separately after
warm-up; pairs/s = 1 / (1 / images_per_s + 1 / texts_per_s), the rate of encoding both.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

from compress.evaluation.common import eval_mode, model_device_dtype, synchronize
from compress.models.attention import HeadAttention
from compress.models.forward import context_length_of, image_size_of
from compress.precision import Precision, resolve_precision

__all__ = ["COUNTERS", "attention_flops", "count_macs", "head_attention_ops", "pairs_per_second", "throughput"]

COUNTERS = ("aten", "torch_pruning")


class _Tower(nn.Module):
    """``forward(x) = model.encode_image(x)`` (or ``encode_text``), for module-level counters."""

    def __init__(self, model: nn.Module, method: str) -> None:
        super().__init__()
        self.model, self.method = model, method

    def forward(self, x: Tensor) -> Tensor:
        return getattr(self.model, self.method)(x)


def head_attention_ops(module: HeadAttention, inputs: tuple[Tensor, ...], output: object) -> None:
    """torch-pruning forward hook for :class:`HeadAttention`: its ``nn.MultiheadAttention``
    formula (see the module docstring) generalised to inner size ``H * d_h != D``."""
    x = inputs[0]
    if x.dim() == 2:
        batch, length = 1, x.shape[0]
    else:
        batch, length = (x.shape[0], x.shape[1]) if module.batch_first else (x.shape[1], x.shape[0])
    d, h, dh = module.embed_dim, module.num_heads, module.head_dim
    inner = h * dh
    ops = length * inner + 3 * length * d * inner
    if module.in_proj_bias is not None:
        ops += 3 * length * inner
    ops += h * (2 * length * length * dh + length * length)
    ops += length * inner * d + length * d
    module.__flops__ += int(ops * batch)


def _image_hw(model: nn.Module, image_size: int | tuple[int, int] | None) -> tuple[int, int]:
    """``(H, W)``: the given size (an int is square), else the model's."""
    if isinstance(image_size, tuple | list):
        return int(image_size[0]), int(image_size[1])
    size = image_size_of(model, image_size)
    return size, size


def _example_inputs(model: nn.Module, image_size: tuple[int, int], context_length: int) -> tuple[Tensor, Tensor]:
    device, dtype = model_device_dtype(model)
    image = torch.zeros(1, 3, *image_size, device=device, dtype=dtype)
    tokens = torch.zeros(1, context_length, dtype=torch.long, device=device)
    return image, tokens


def attention_flops(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> int:
    """FLOPs of softmax(Q·Kᵀ)·V for q [..., L, d_h], k [..., S, d_h], v [..., S, d_v]:
    2·L·S·(d_h + d_v) per leading (batch, head) row of q, as two ``bmm`` count them (the mask,
    causal or not, and the softmax are not counted). Takes tensors or shapes."""
    q, k, v = (tuple(x.shape) if isinstance(x, Tensor) else tuple(x) for x in (query, key, value))
    return 2 * math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


@functools.cache
def _attention_kernels() -> tuple[Any, ...]:
    """Every forward ``aten`` attention op of this torch taking (query, key, value, ...) in
    [..., L, E] layout: the public ``scaled_dot_product_attention`` and its fused kernels."""
    names = {n.split("::", 1)[1].split(".", 1)[0] for n in torch._C._dispatch_get_all_op_names()}
    names = {n for n in names if n.startswith(("scaled_dot_product_", "_scaled_dot_product_"))}
    return tuple(getattr(torch.ops.aten, n) for n in sorted(names) if not n.endswith("_backward"))


class _UncountedAttentionGuard(TorchDispatchMode):
    """Raises on an attention kernel that the counter has no formula for (it would count 0)."""

    def __init__(self, known: Sequence[Any]) -> None:
        super().__init__()
        self.known = set(known)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        packet = getattr(func, "_overloadpacket", func)
        name = getattr(packet, "__name__", str(packet))
        if ("attention" in name or "attn" in name) and packet not in self.known:
            raise RuntimeError(f"MACs: no FLOP formula for the attention kernel aten.{name}; it would count 0")
        return func(*args, **(kwargs or {}))


def _aten_macs(tower: nn.Module, example: Tensor) -> int:
    """FLOPs / 2 of one forward (see the module docstring). ``nn.MultiheadAttention``'s
    inference fast path (one fused kernel) is switched off meanwhile, so open_clip's
    unconverted attention is counted like the converted one."""
    formulas: dict[Any, Callable[..., int]] = {op: attention_flops for op in _attention_kernels()}
    known = [*getattr(flop_counter, "flop_registry", {}), *formulas]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        counter = flop_counter.FlopCounterMode(display=False, custom_mapping=formulas)
        with torch.no_grad(), counter, _UncountedAttentionGuard(known):
            tower(example)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return int(counter.get_total_flops()) // 2


def _torch_pruning_ops(tower: nn.Module, example: Tensor) -> int:
    from torch_pruning.utils import op_counter

    op_counter.CUSTOM_MODULES_MAPPING = {HeadAttention: head_attention_ops}
    try:
        ops, _ = op_counter.count_ops_and_params(tower, example)
    finally:
        op_counter.CUSTOM_MODULES_MAPPING = {}
    return int(round(ops))


def count_macs(
    model: nn.Module,
    image_size: int | tuple[int, int] | None = None,
    context_length: int | None = None,
    counter: str = "aten",
) -> dict[str, int]:
    """``{"macs_image", "macs_text"}``: MACs to encode one image / one text (see the module docstring).

    ``image_size`` (an int or ``(H, W)``) and ``context_length`` default to the model's
    (:func:`~compress.models.forward.image_size_of`, :func:`~compress.models.forward.context_length_of`)."""
    if counter not in COUNTERS:
        raise ValueError(f"counter must be one of {COUNTERS}, got {counter!r}")
    image, tokens = _example_inputs(model, _image_hw(model, image_size), context_length_of(model, context_length))
    count = _aten_macs if counter == "aten" else _torch_pruning_ops
    with eval_mode(model):
        return {
            "macs_image": count(_Tower(model, "encode_image"), image),
            "macs_text": count(_Tower(model, "encode_text"), tokens),
        }


def pairs_per_second(images_per_s: float, texts_per_s: float) -> float:
    """Harmonic combination 1 / (1 / images_per_s + 1 / texts_per_s) (TinyCLIP)."""
    return 1.0 / (1.0 / images_per_s + 1.0 / texts_per_s)


def _rate(fn: object, x: Tensor, device: torch.device, precision: Precision, warmup: int, iters: int) -> float:
    """Samples per second of ``fn(x)`` over ``iters`` calls after ``warmup`` calls."""
    with torch.inference_mode(), precision.autocast():
        for _ in range(warmup):
            fn(x)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            fn(x)
        synchronize(device)
        elapsed = time.perf_counter() - start
    return x.shape[0] * iters / max(elapsed, 1e-9)


def throughput(
    model: nn.Module,
    image_size: int | tuple[int, int] | None = None,
    context_length: int | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 64,
    warmup: int = 3,
    iters: int = 10,
    precision: str = "fp32",
) -> dict[str, float]:
    """``{"images_per_s", "texts_per_s", "pairs_per_s"}`` with zero inputs of ``batch_size``.

    ``device`` defaults to the model's; the model is not moved. Timed with
    ``torch.inference_mode`` and CUDA synchronisation; autocast as :func:`~compress.precision.resolve_precision`."""
    if batch_size < 1 or iters < 1 or warmup < 0:
        raise ValueError("throughput needs batch_size >= 1, iters >= 1, warmup >= 0")
    model_device, dtype = model_device_dtype(model)
    device = torch.device(device) if device is not None else model_device
    height, width = _image_hw(model, image_size)
    policy = resolve_precision(precision, device)
    images = torch.zeros(batch_size, 3, height, width, device=device, dtype=dtype)
    tokens = torch.zeros(batch_size, context_length_of(model, context_length), dtype=torch.long, device=device)
    with eval_mode(model):
        images_per_s = _rate(model.encode_image, images, device, policy, warmup, iters)
        texts_per_s = _rate(model.encode_text, tokens, device, policy, warmup, iters)
    out = {"images_per_s": images_per_s, "texts_per_s": texts_per_s}
    out["pairs_per_s"] = pairs_per_second(images_per_s, texts_per_s)
    if not all(math.isfinite(v) and v > 0 for v in out.values()):
        raise RuntimeError(f"throughput measurement failed: {out}")
    return out
