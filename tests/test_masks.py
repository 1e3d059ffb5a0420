"""Hard-concrete gates, the expected-size formula and the sparsity Lagrangian, against
formulas written out independently here."""

from __future__ import annotations

import math

import pytest
import torch

from compress.masks import (
    HardConcreteGates,
    SparsityLagrangian,
    attach_masks,
    count_prunable,
    deterministic_gates,
    keep_probability,
    prune_masked,
    sample_gates,
)
from compress.masks.modules import masked_layer_norm
from compress.models import load_model
from compress.models.params import parameter_report

L, R, BETA = -0.1, 1.1, 2.0 / 3.0


def _closed_form_keep(log_alpha: torch.Tensor) -> torch.Tensor:
    # P(z > 0) = P(s > -l / (r - l)) = 1 - sigmoid(beta * logit(-l / (r - l)) - log_alpha)
    threshold = -L / (R - L)
    return 1.0 - torch.sigmoid(BETA * math.log(threshold / (1 - threshold)) - log_alpha)


def test_keep_probability_closed_form_and_monte_carlo() -> None:
    torch.manual_seed(0)
    log_alpha = torch.linspace(-4.0, 4.0, 9)
    expected = torch.sigmoid(log_alpha - BETA * math.log(-L / R))
    assert torch.allclose(keep_probability(log_alpha), expected, atol=1e-7)
    assert torch.allclose(keep_probability(log_alpha), _closed_form_keep(log_alpha), atol=1e-6)
    samples = sample_gates(log_alpha.expand(100_000, -1).contiguous())
    assert samples.min() >= 0 and samples.max() <= 1
    assert ((samples == 0).any(0) & (samples == 1).any(0))[3:6].all()  # exact zeros and ones occur
    monte_carlo = (samples != 0).float().mean(0)
    assert torch.allclose(monte_carlo, expected, atol=0.01)


def test_sample_matches_quantile_formula() -> None:
    torch.manual_seed(3)
    log_alpha = torch.randn(50)
    z = sample_gates(log_alpha)
    torch.manual_seed(3)
    _ = torch.randn(50)
    u = torch.empty(50).uniform_(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_alpha) / BETA)
    assert torch.allclose(z, torch.clamp(s * (R - L) + L, 0, 1), atol=1e-6)


def test_deterministic_mask_zero_count_and_values() -> None:
    torch.manual_seed(1)
    log_alpha = torch.empty(40).uniform_(-4.6, 4.6)
    mask = deterministic_gates(log_alpha)
    zeros = round(float((1 - torch.sigmoid(log_alpha - BETA * math.log(-L / R))).sum()))
    assert int((mask == 0).sum()) == zeros
    soft = torch.sigmoid(0.8 * log_alpha / BETA)
    kept = mask != 0
    assert torch.equal(mask[kept], soft[kept])  # kept values are the soft values, not 1
    assert soft[~kept].max() <= soft[kept].min()  # the smallest soft values were zeroed


def test_gates_clamp_segments_and_modes() -> None:
    gates = HardConcreteGates([3, 0, 2])
    assert torch.allclose(gates.log_alpha, torch.full((5,), math.log(100.0)))  # init 10, clamped
    with torch.no_grad():
        gates.log_alpha.copy_(torch.tensor([-9.0, 9.0, 0.3, -3.0, -9.0]))
    gates.clamp_()
    assert gates.log_alpha.tolist() == pytest.approx([math.log(0.01), math.log(100), 0.3, -3.0, math.log(0.01)])
    gates.eval()
    parts = gates.split(gates())
    assert [p.numel() for p in parts] == [3, 0, 2]
    assert torch.equal(parts[0], deterministic_gates(gates.log_alpha[:3]))  # per segment
    gates.train()
    assert gates().requires_grad


def test_held_sample_is_reused_and_recomputed_from_log_alpha() -> None:
    """hold_sample: one noise draw u, reused by every sample() until release (one sample per
    optimizer step); each pass still recomputes z from log_alpha, so each has its own graph."""
    gates = HardConcreteGates([6, 4], init=0.0).train()
    torch.manual_seed(11)
    gates.hold_sample()
    first, second = gates(), gates()
    assert torch.equal(first, second)
    torch.manual_seed(11)
    assert torch.equal(first, sample_gates(gates.log_alpha.detach()))  # the same draw as a fresh sample
    first.sum().backward()
    second.sum().backward()  # a second backward: not through the first pass's graph
    with torch.no_grad():
        gates.log_alpha.add_(1.0)
    assert not torch.equal(gates(), first)  # same noise, new log_alpha
    gates.release_sample()
    assert gates._noise is None and not torch.equal(gates(), gates())


def test_one_sample_covers_every_gate_of_a_model(teacher: torch.nn.Module) -> None:
    import copy

    from compress.masks import one_gate_sample

    model = copy.deepcopy(teacher)
    masks = attach_masks(model, layer_gates=True).train()
    gates = [g for t in masks.towers.values() for g in t.gate_modules()]
    with one_gate_sample(model):
        assert all(g._noise is not None for g in gates)
        assert all(torch.equal(g(), g()) for g in gates)
    assert all(g._noise is None for g in gates)
    with one_gate_sample(teacher):  # no masks: nothing to hold
        pass


def test_one_sample_draws_every_gate_in_one_draw(teacher: torch.nn.Module, monkeypatch) -> None:
    """A step's gate noise is one draw from the step's generator (on CUDA: one kernel on the device, no
    host copy per gate module), and the numbers are those of one draw per gate module in turn."""
    import copy

    from compress.masks import attach, one_gate_sample
    from compress.masks.gates import EPS

    model = copy.deepcopy(teacher)
    masks = attach_masks(model, layer_gates=True).train()
    gates = [g for t in masks.towers.values() for g in t.gate_modules()]
    calls = []
    original = attach.logistic_noise
    monkeypatch.setattr(attach, "logistic_noise", lambda *a, **k: calls.append(1) or original(*a, **k))
    generator = torch.Generator().manual_seed(9)
    with one_gate_sample(model, generator):
        held = [g._noise.clone() for g in gates]
    assert len(calls) == 1 and len(gates) > 1
    generator = torch.Generator().manual_seed(9)
    for g, noise in zip(gates, held, strict=True):
        u = torch.empty(g.log_alpha.shape).uniform_(EPS, 1.0 - EPS, generator=generator)
        assert torch.equal(noise, torch.log(u) - torch.log1p(-u))


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    return load_model("cc-test-teacher")


@pytest.mark.parametrize("layer_gates", [False, True])
def test_expected_size_is_exact_at_hard_probabilities(teacher: torch.nn.Module, layer_gates: bool) -> None:
    import copy

    model = copy.deepcopy(teacher)
    masks = attach_masks(model, layer_gates=layer_gates)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for tower in masks.towers.values():
            for gates in tower.gate_modules():
                gates.log_alpha.uniform_(-4.6, 4.6, generator=generator)
    full = {name: count_prunable(model, (name,)) for name in masks.towers}
    report = parameter_report(teacher)
    assert full == {"vision": report["vision"], "text": report["text"]}
    assert {n: t.costs.full for n, t in masks.towers.items()} == pytest.approx(full)
    predicted = {name: float(t.deterministic_size()) for name, t in masks.towers.items()}
    pruned = prune_masked(model)
    report = parameter_report(pruned)
    brute_force = {"vision": report["vision"], "text": report["text"]}
    assert brute_force == {name: count_prunable(pruned, (name,)) for name in masks.towers}
    assert predicted == brute_force
    assert brute_force["vision"] < full["vision"] and brute_force["text"] < full["text"]


def test_expected_size_is_differentiable_and_monotone(teacher: torch.nn.Module) -> None:
    import copy

    masks = attach_masks(copy.deepcopy(teacher), towers="vision")
    tower = masks.towers["vision"]
    size = tower.expected_size()
    assert size < tower.costs.full  # keep probabilities are below 1 even at log_alpha = ln 100
    size.backward()
    for gates in tower.gate_modules():
        assert (gates.log_alpha.grad > 0).all()  # more keep probability, more parameters


def _run_lagrangian(mode: str, lambda_init: float | None, steps: int = 5) -> tuple[list[tuple[float, ...]], float]:
    """Expected sparsity p = 0.1 + 0.01 (1 - sigmoid(log_alpha)) against target q = 0.5 (not met):
    mask logit by descent, multipliers by ascent. Returns (loss, dL/dlog_alpha, lambda_1, lambda_2)
    per step and the final log_alpha."""
    log_alpha = torch.nn.Parameter(torch.tensor(0.0))
    lagrangian = SparsityLagrangian(mode, lambda_init=lambda_init)
    optimizer = torch.optim.AdamW(
        [{"params": [log_alpha], "lr": 0.1, "weight_decay": 0.0},
         {"params": list(lagrangian.parameters()), "lr": 0.5, "weight_decay": 0.0, "maximize": True}]
    )
    history = []
    for _ in range(steps):
        loss = lagrangian(0.1 + 0.01 * (1 - torch.sigmoid(log_alpha)), 0.5)
        optimizer.zero_grad()
        loss.backward()
        history.append((loss.item(), log_alpha.grad.item(), lagrangian.lambda_1.item(), lagrangian.lambda_2.item()))
        optimizer.step()
    return history, log_alpha.item()


@pytest.mark.parametrize(("mode", "lambda_init"), [("one_sided", None), ("two_sided", None), ("two_sided", 10.0)])
def test_lagrangian_pushes_to_sparsity_and_lambdas_grow_when_target_unmet(mode: str, lambda_init: float | None) -> None:
    history, log_alpha = _run_lagrangian(mode, lambda_init)
    lambda_1, lambda_2 = [h[2] for h in history], [h[3] for h in history]
    assert lambda_2 == sorted(lambda_2) and lambda_2[-1] > lambda_2[0]  # grows under ascent
    if mode == "one_sided":
        assert lambda_1 == sorted(lambda_1) and lambda_1[0] == 10.0  # TinyCLIP's code: start at 10, grow
        assert all(h[1] > 0 for h in history)  # dL/dlog_alpha > 0: descent lowers log_alpha (more sparsity)
    else:
        assert lambda_1 == sorted(lambda_1, reverse=True)  # lambda_1 (p - q) with p < q: lambda_1 -> -inf
    if lambda_init is None:
        assert log_alpha < 0  # towards more sparsity from the first step
        assert history[-1][0] > history[0][0]  # the penalty grows while the target is not met


def test_two_sided_and_one_sided_when_target_exceeded() -> None:
    p = torch.tensor(0.7, requires_grad=True)
    one = SparsityLagrangian("one_sided", lambda_init=10.0)
    assert one(p, 0.5).item() == 0.0  # more sparse than asked: no penalty
    two = SparsityLagrangian("two_sided", lambda_init=10.0)
    value = two(p, 0.5)
    assert value.item() == pytest.approx(10 * 0.2 + 10 * 0.04)
    (grad,) = torch.autograd.grad(value, p)
    assert float(grad) > 0  # pulls the sparsity back down towards the target
    (lambda_grad,) = torch.autograd.grad(two(p, 0.5), two.lambda_1)
    assert float(lambda_grad) == pytest.approx(0.2)  # ascent raises lambda_1 while p > q


def test_masked_layer_norm_is_layer_norm_over_kept_channels() -> None:
    torch.manual_seed(5)
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(16, dtype=torch.float64, requires_grad=True)
    keep = (torch.rand(16) > 0.4).double()
    kept = keep.bool()
    probe = torch.randn(3, 7, 16, dtype=torch.float64)
    y = masked_layer_norm(x, keep, weight, bias, 1e-5)
    reference = torch.nn.functional.layer_norm(x[..., kept], (int(kept.sum()),), weight[kept], bias[kept], 1e-5)
    assert torch.allclose(y[..., kept], reference, atol=1e-10) and (y[..., ~kept] == 0).all()
    grads = torch.autograd.grad((y * probe).sum(), (x, weight, bias))
    expected = torch.autograd.grad((reference * probe[..., kept]).sum(), (x, weight, bias))
    for g, e in zip(grads, expected, strict=True):
        assert torch.allclose(g, e, atol=1e-9)
