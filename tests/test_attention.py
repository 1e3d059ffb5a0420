"""HeadAttention: exact conversion of open_clip's nn.MultiheadAttention, free head count and
inner size, head gates, masks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from open_clip.transformer import AttentionalPooler
from torch import nn

from compress.masks.modules import GatedLinear
from compress.models import HeadAttention, build_from_config, convert_attention, get_model_config, is_converted

TOL = 1e-5


def _pair(name: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    original = build_from_config(get_model_config(name), convert=False).eval()
    converted = convert_attention(copy.deepcopy(original)).eval()
    return original, converted


@pytest.fixture(scope="module")
def vit_b32() -> tuple[nn.Module, nn.Module]:
    return _pair("ViT-B-32")


@pytest.fixture(scope="module")
def tiny() -> tuple[nn.Module, nn.Module]:
    return _pair("cc-test-teacher")


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _outputs(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


@pytest.mark.slow
def test_vit_b32_conversion_is_exact(vit_b32: tuple[nn.Module, nn.Module]) -> None:
    original, converted = vit_b32
    assert is_converted(converted) and not is_converted(original)
    torch.manual_seed(1)
    images, tokens = torch.randn(2, 3, 224, 224), torch.randint(0, 49408, (2, 77))
    for before, after in zip(_outputs(original, images, tokens), _outputs(converted, images, tokens), strict=True):
        assert _max_diff(before, after) < TOL


def test_tiny_teacher_conversion_is_exact(tiny: tuple[nn.Module, nn.Module]) -> None:
    original, converted = tiny
    torch.manual_seed(2)
    images, tokens = torch.randn(3, 3, 32, 32), torch.randint(0, 49408, (3, 16))
    for before, after in zip(_outputs(original, images, tokens), _outputs(converted, images, tokens), strict=True):
        assert _max_diff(before, after) < TOL
    # the training path (grad enabled, train mode) too
    original.train(), converted.train()
    try:
        assert _max_diff(original.encode_text(tokens), converted.encode_text(tokens)) < TOL
    finally:
        original.eval(), converted.eval()


def test_state_dict_keys_unchanged(vit_b32: tuple[nn.Module, nn.Module], tiny: tuple[nn.Module, nn.Module]) -> None:
    for original, converted in (vit_b32, tiny):
        before, after = original.state_dict(), converted.state_dict()
        assert list(before) == list(after)
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_conversion_is_idempotent(tiny: tuple[nn.Module, nn.Module]) -> None:
    converted = tiny[1]
    attn = converted.transformer.resblocks[0].attn
    convert_attention(converted)
    assert converted.transformer.resblocks[0].attn is attn


def test_gradients_flow(tiny: tuple[nn.Module, nn.Module]) -> None:
    model = copy.deepcopy(tiny[1]).train()
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(0, 49408, (2, 16))
    (model.encode_image(images).sum() + model.encode_text(tokens).sum()).backward()
    for module in model.modules():
        if isinstance(module, HeadAttention):
            for p in (module.in_proj_weight, module.in_proj_bias, module.out_proj.weight):
                assert p.grad is not None and p.grad.abs().sum() > 0


def _mha(batch_first: bool, dim: int = 32, heads: int = 4) -> tuple[nn.MultiheadAttention, HeadAttention]:
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    return mha.eval(), HeadAttention.from_multihead(mha).eval()


def _causal(n: int) -> torch.Tensor:
    """open_clip's text mask: float, -inf above the diagonal."""
    return torch.full((n, n), float("-inf")).triu(1)


@pytest.mark.parametrize("batch_first", [True, False])
def test_standalone_multihead_conversion(batch_first: bool) -> None:
    mha, head = _mha(batch_first)
    assert head.batch_first == batch_first
    x = torch.randn(5, 3, 32)  # [N, L, D] or [L, N, D]
    for mask in (None, _causal(5 if not batch_first else 3)):
        expected = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
        assert _max_diff(head(x, x, x, need_weights=False, attn_mask=mask)[0], expected) < TOL


def test_mask_forms_match_multihead() -> None:
    mha, head = _mha(True)
    n, length = 2, 6
    x = torch.randn(n, length, 32)
    bool_causal = torch.ones(length, length, dtype=torch.bool).triu(1)  # True = masked (MHA)
    per_head = torch.randn(n * 4, length, length)
    padding = torch.zeros(n, length, dtype=torch.bool)
    padding[0, -2:] = True
    cases = [
        {"attn_mask": _causal(length)},
        {"attn_mask": bool_causal},
        {"attn_mask": per_head},
        {"key_padding_mask": padding},
        {"attn_mask": bool_causal, "key_padding_mask": padding},
    ]
    for kwargs in cases:
        expected = mha(x, x, x, need_weights=False, **kwargs)[0]
        assert _max_diff(head(x, x, x, need_weights=False, **kwargs)[0], expected) < TOL, kwargs


def test_unbatched_input() -> None:
    mha, head = _mha(True)
    x = torch.randn(4, 32)
    assert _max_diff(head(x)[0], mha(x, x, x, need_weights=False)[0]) < TOL


def test_cross_attention_is_refused_and_left_unconverted() -> None:
    _, head = _mha(True)
    x, y = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    with pytest.raises(NotImplementedError):
        head(x, y, y)
    pooler = AttentionalPooler(d_model=32, context_dim=32, n_head=2, n_queries=4)
    convert_attention(pooler)
    assert isinstance(pooler.attn, nn.MultiheadAttention)


def test_zero_heads_returns_output_bias() -> None:
    attn = HeadAttention(embed_dim=16, num_heads=0, head_dim=8)
    with torch.no_grad():
        attn.out_proj.bias.normal_()
    x = torch.randn(2, 5, 16)
    out, weights = attn(x, x, x, attn_mask=_causal(5))
    assert weights is None
    assert out.shape == x.shape
    assert torch.equal(out, attn.out_proj.bias.expand(2, 5, 16))
    assert attn.in_proj_weight.shape == (0, 16) and attn.out_proj.weight.shape == (16, 0)


def reference_attention(attn: HeadAttention, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(Q_h K_h^T / sqrt(d) + mask) V_h per head, written out; x is [N, L, D]."""
    inner, d = attn.num_heads * attn.head_dim, attn.head_dim
    w, b = attn.in_proj_weight, attn.in_proj_bias
    q, k, v = (x @ w[i * inner : (i + 1) * inner].T + b[i * inner : (i + 1) * inner] for i in range(3))
    heads = []
    for h in range(attn.num_heads):
        qh, kh, vh = (t[..., h * d : (h + 1) * d] for t in (q, k, v))
        scores = qh @ kh.transpose(-1, -2) / math.sqrt(d)
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        heads.append(weights @ vh)
    return torch.cat(heads, dim=-1) @ attn.out_proj.weight.T + attn.out_proj.bias


def _random_head_attention(embed: int, heads: int, head_dim: int) -> HeadAttention:
    torch.manual_seed(4)
    attn = HeadAttention(embed, heads, head_dim)
    with torch.no_grad():
        attn.in_proj_bias.normal_()
        attn.out_proj.bias.normal_()
    return attn


def test_inner_size_differs_from_width() -> None:
    attn = _random_head_attention(64, 2, 16)
    assert attn.inner_dim == 32
    assert attn.in_proj_weight.shape == (96, 64) and attn.out_proj.weight.shape == (64, 32)
    x = torch.randn(3, 7, 64)
    assert _max_diff(attn(x)[0], reference_attention(attn, x)) < TOL
    mask = _causal(7)
    assert _max_diff(attn(x, x, x, attn_mask=mask)[0], reference_attention(attn, x, mask)) < TOL


def _without_head(attn: HeadAttention, drop: int) -> HeadAttention:
    """The same attention with head ``drop`` removed: its q/k/v rows and out_proj columns."""
    d, inner = attn.head_dim, attn.inner_dim
    keep = [h for h in range(attn.num_heads) if h != drop]
    cols = torch.cat([torch.arange(h * d, (h + 1) * d) for h in keep])
    rows = torch.cat([cols + i * inner for i in range(3)])
    small = HeadAttention(attn.embed_dim, len(keep), d)
    with torch.no_grad():
        small.in_proj_weight.copy_(attn.in_proj_weight[rows])
        small.in_proj_bias.copy_(attn.in_proj_bias[rows])
        small.out_proj.weight.copy_(attn.out_proj.weight[:, cols])
        small.out_proj.bias.copy_(attn.out_proj.bias)
    return small


def test_head_mask_on_out_proj_columns_equals_removed_head() -> None:
    """Heads are gated in one place: the masks' GatedLinear on out_proj's input columns."""
    attn = _random_head_attention(48, 3, 16)
    assert not hasattr(attn, "head_gate")  # no second gating mechanism on the attention itself
    x = torch.randn(2, 5, 48)
    small = _without_head(attn, 1)
    attn.out_proj = GatedLinear.wrap(attn.out_proj)
    gate = torch.tensor([1.0, 0.0, 1.0], requires_grad=True)
    attn.out_proj.col_gate = gate.repeat_interleave(16)
    out = attn(x)[0]
    assert _max_diff(out, small(x)[0]) < TOL
    out.sum().backward()
    assert gate.grad is not None and gate.grad.abs().sum() > 0


def test_text_tower_causal_mask_goes_to_sdpa_as_is_causal(tiny: tuple[nn.Module, nn.Module], monkeypatch) -> None:
    """The text tower's explicit causal mask is recognised (once per mask tensor: one look at its values,
    not one per block or call) and SDPA gets ``is_causal=True`` without a mask (flash kernels allowed);
    the outputs equal the explicit-mask path within float tolerance."""
    import torch.nn.functional as F

    from compress.models import attention

    _, converted = tiny
    tokens = torch.randint(0, 49408, (2, converted.context_length), generator=torch.Generator().manual_seed(0))
    calls: list[tuple[bool, bool]] = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kwargs):
        calls.append((attn_mask is None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    looks = []
    equal = torch.equal
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(torch, "equal", lambda a, b: looks.append(1) or equal(a, b))
    attention._CAUSAL_MEMO.clear()
    with torch.no_grad():
        fast = converted.encode_text(tokens)
        converted.encode_text(tokens)
    blocks = len(converted.transformer.resblocks)
    assert calls == [(True, True)] * (2 * blocks) and len(looks) == 1
    monkeypatch.setattr(torch, "equal", equal)
    monkeypatch.setattr(attention, "is_causal_mask", lambda mask, n: False)  # the explicit mask, as before
    calls.clear()
    with torch.no_grad():
        explicit = converted.encode_text(tokens)
    assert calls == [(False, False)] * blocks
    torch.testing.assert_close(fast, explicit, rtol=1e-5, atol=1e-6)


def test_a_mask_that_is_not_causal_is_passed_as_given() -> None:
    from compress.models.attention import is_causal_mask

    n = 6
    causal = torch.full((n, n), float("-inf")).triu(1)
    assert is_causal_mask(causal, n) and is_causal_mask(torch.ones(n, n, dtype=torch.bool).triu(1), n)
    banded = causal.clone()
    banded[3, 0] = float("-inf")
    assert not is_causal_mask(banded, n) and not is_causal_mask(causal, n + 1) and not is_causal_mask(None, n)
    causal[3, 0] = float("-inf")  # changed in place: looked at again
    assert not is_causal_mask(causal, n)
