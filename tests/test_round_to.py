"""``round_to`` of automatic inheritance: kept MLP widths and residual widths become multiples of it,
the pruned model stays exactly the masked one, and the achieved sparsity stays near the unrounded one."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from compress.masks import attach_masks, count_prunable, deterministic_gates, get_masks, prune_masked
from compress.masks.gates import BETA, round_kept
from compress.models import load_model
from compress.registry import INHERITANCE
from compress.teacher import freeze


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    torch.manual_seed(0)
    return freeze(load_model("cc-test-teacher"))


def _nearest_allowed(kept: int, size: int, r: int) -> int:
    """Brute force: the allowed counts are 0, the multiples of r up to size, and size; a kept count
    > 0 never becomes 0; the nearest wins, a tie goes to the larger."""
    if kept == 0:
        return 0
    allowed = sorted({*range(r, size + 1, r), size})
    return min(allowed, key=lambda a: (abs(a - kept), -a))


def test_round_kept_is_the_nearest_allowed_count() -> None:
    for size in (1, 7, 8, 30, 64, 100):
        for r in (1, 2, 8, 16):
            for kept in range(size + 1):
                assert round_kept(kept, size, r) == _nearest_allowed(kept, size, r), (kept, size, r)


def test_rounded_deterministic_mask_keeps_the_best_scoring_units() -> None:
    torch.manual_seed(1)
    for _ in range(20):
        log_alpha = torch.empty(100).uniform_(-4.6, 4.6)
        plain, rounded = deterministic_gates(log_alpha), deterministic_gates(log_alpha, round_to=8)
        kept = rounded != 0
        assert int(kept.sum()) == round_kept(int((plain != 0).sum()), 100, 8)
        assert int(kept.sum()) % 8 == 0
        soft = torch.sigmoid(0.8 * log_alpha / BETA)
        assert torch.equal(rounded[kept], soft[kept])  # added units keep their soft value too
        assert soft[~kept].max() <= soft[kept].min()  # the kept set is the top of the ranking


def test_round_to_parameter_is_checked(teacher: nn.Module) -> None:
    assert INHERITANCE.build({"name": "auto"}).round_to == 8
    for bad in (0, -8, 2.5, True):
        with pytest.raises(ValueError, match="round_to"):
            INHERITANCE.build({"name": "auto", "round_to": bad})
    strategy = INHERITANCE.build({"name": "auto", "round_to": 128})  # the tiny towers are 64 wide
    with pytest.raises(ValueError, match="round_to=128 .* smallest width"):
        strategy.inherit(None, teacher)


def _ragged_log_alpha(masks, generator: torch.Generator) -> None:
    """Log alphas that drop a random share of every segment (ln 0.01) and keep the rest (ln 100)."""
    with torch.no_grad():
        for tower in masks.towers.values():
            for gates in tower.gate_modules():
                for part in torch.split(gates.log_alpha, gates.segments):
                    n = part.numel()
                    dropped = int(torch.randint(0, n // 2 + 1, (), generator=generator)) if n > 1 else 0
                    order = torch.randperm(n, generator=generator)
                    values = torch.full((n,), math.log(100.0))
                    values[order[:dropped]] = math.log(0.01)
                    part.copy_(values + 0.01 * torch.randn(n, generator=generator))  # a strict ranking


@pytest.mark.parametrize("round_to", [8, 16])
def test_pruned_widths_are_multiples_and_the_export_is_exact(teacher: nn.Module, round_to: int) -> None:
    strategy = INHERITANCE.build({"name": "auto", "round_to": round_to, "layer_gates": False})
    plain = INHERITANCE.build({"name": "auto", "round_to": 1})
    student, unrounded = strategy.inherit(None, teacher), plain.inherit(None, teacher)
    _ragged_log_alpha(get_masks(student), torch.Generator().manual_seed(round_to))
    get_masks(unrounded).load_state_dict(get_masks(student).state_dict())
    size = sum(float(t.deterministic_size()) for t in get_masks(student).towers.values())
    exported, reference = strategy.export(student), plain.export(unrounded)
    assert count_prunable(exported) == size  # the logged mask sparsity counts the rounding
    for name, tower in exported.clip_structure.items():
        widths = [tower["width"], *tower["mlp_width"]]
        assert all(w % round_to == 0 for w in widths), (name, widths)
        assert tower["heads"] == reference.clip_structure[name]["heads"]  # heads are left alone
    ragged = [w for t in reference.clip_structure.values() for w in (t["width"], *t["mlp_width"])]
    assert any(w % round_to for w in ragged)  # without rounding the widths are not multiples
    student.eval()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    texts = torch.randint(1, 49406, (4, 16), generator=torch.Generator().manual_seed(1))
    texts[:, -1] = 49407
    with torch.no_grad():
        for encode in ("encode_image", "encode_text"):
            x = images if encode == "encode_image" else texts
            assert torch.allclose(getattr(student, encode)(x), getattr(exported, encode)(x), atol=1e-5), encode


def test_rounding_keeps_the_achieved_sparsity_within_the_tolerance() -> None:
    # TinyCLIP-ViT-8M/16 (widths 256 / 1024): small, but as wide as a real pruned tower gets
    base = load_model("TinyCLIP-ViT-8M-16-Text-3M")
    full = count_prunable(base)
    plain = attach_masks(copy.deepcopy(base), round_to=1)
    diffs = []
    for seed in range(4):
        rounded = attach_masks(copy.deepcopy(base), round_to=8)
        generator = torch.Generator().manual_seed(seed)
        _ragged_log_alpha(rounded, generator)  # 40-50% of the prunable parameters go: a realistic target
        plain.load_state_dict(rounded.state_dict())
        achieved = {k: 1 - sum(float(t.deterministic_size()) for t in m.towers.values()) / full
                    for k, m in (("plain", plain), ("rounded", rounded))}
        assert 0.3 < achieved["plain"] < 0.7
        diffs.append(achieved["rounded"] - achieved["plain"])
        for t in rounded.towers.values():
            assert t.counts()["channels"] % 8 == 0
    assert max(abs(d) for d in diffs) < 0.02, diffs
    model = copy.deepcopy(base)
    attach_masks(model, round_to=8).load_state_dict(rounded.state_dict())
    assert 1 - count_prunable(prune_masked(model)) / full == pytest.approx(achieved["rounded"])
