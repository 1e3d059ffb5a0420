"""The ``auto`` inheritance plug-in: masks learn towards a target sparsity, then the model is pruned."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from compress.masks import count_prunable, get_masks
from compress.models import load_model
from compress.models.forward import clip_forward
from compress.optim import build_adamw, weight_groups
from compress.registry import INHERITANCE, LOSSES, RegistryError
from compress.teacher import freeze


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    torch.manual_seed(0)
    return freeze(load_model("cc-test-teacher"))


def _optimizer(strategy, student: nn.Module) -> torch.optim.Optimizer:
    """As the trainer builds it: weight groups without the strategy's parameters, plus its groups."""
    own = strategy.param_groups(student)
    groups = weight_groups([("", student)], 0.2, strategy.owned_parameters(student)) + own
    return build_adamw(groups, 1e-4, (0.9, 0.98), 1e-6)


def test_registered_with_checked_parameters() -> None:
    strategy = INHERITANCE.build({"name": "auto", "target_sparsity": 0.25, "lagrangian": "one_sided"})
    assert strategy.needs_student_config is False
    with pytest.raises(RegistryError, match="target_sparsity"):
        INHERITANCE.build({"name": "auto", "target_sparsty": 0.5})
    with pytest.raises(ValueError, match="lagrangian"):
        INHERITANCE.build({"name": "auto", "lagrangian": "both"})


def test_param_groups_and_trainable_copy(teacher: nn.Module) -> None:
    strategy = INHERITANCE.build({"name": "auto", "mask_lr": 0.03, "lambda_lr": 0.04})
    student = strategy.inherit(None, teacher)
    assert student is not teacher and get_masks(teacher) is None
    assert all(p.requires_grad for p in student.parameters())
    masks, lambdas = strategy.param_groups(student)
    assert masks["lr"] == 0.03 and masks["weight_decay"] == 0.0 and not masks.get("maximize", False)
    assert lambdas["lr"] == 0.04 and lambdas["maximize"] is True and len(lambdas["params"]) == 2
    assert all(p.item() == 0.0 for p in lambdas["params"])  # two-sided: CoFi's start at 0
    optimizer = _optimizer(strategy, student)
    ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(student.parameters()))
    assert [g.get("maximize", False) for g in optimizer.param_groups].count(True) == 1


@pytest.mark.slow
def test_short_run_reaches_target_then_prunes_and_trains_on(teacher: nn.Module) -> None:
    torch.manual_seed(0)
    target = 0.5
    strategy = INHERITANCE.build({
        "name": "auto", "target_sparsity": target, "ramp_steps": 20, "prune_step": 50,
        "mask_lr": 0.3, "lambda_lr": 1.0,  # larger than TinyCLIP's 0.02: 50 steps instead of 3000
    })
    student = strategy.inherit(None, teacher).train()
    student.token_embedding.requires_grad_(False)  # speed: a 3M-row table the masks do not need
    full = count_prunable(student)
    loss_fn = LOSSES.build("affinity")
    optimizer = _optimizer(strategy, student)
    generator = torch.Generator().manual_seed(0)
    log, pruned_at = [], None
    for step in range(60):
        images = torch.randn(8, 3, 32, 32, generator=generator)
        texts = torch.randint(1, 49406, (8, 16), generator=generator)
        texts[:, -1] = 49407
        with torch.no_grad():
            teacher_out = clip_forward(teacher, images, texts)
        terms = loss_fn(clip_forward(student, images, texts), teacher_out)
        terms.update(strategy.regularizer(student, step))
        loss = sum(terms.values())
        assert torch.isfinite(loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        replaces = strategy.replaces_at(student, step + 1)  # what the trainer asks before on_step
        replacement = strategy.on_step(student, step + 1)
        assert replaces is (replacement is not None)
        if replacement is not None:
            assert pruned_at is None
            pruned_at, student = step + 1, replacement.train()
            optimizer = _optimizer(strategy, student)
            assert not [g for g in optimizer.param_groups if g.get("maximize")]
        log.append(strategy.log_values(student))
    assert pruned_at == 50 and get_masks(student) is None
    before = log[48]
    assert before["expected_sparsity/all"] == pytest.approx(target, abs=0.08)
    # two-sided, p < q for most of the run: ascent drives lambda_1 (p - q) and lambda_2 (p - q)^2 up
    assert before["lambda_1/all"] < -5.0 and before["lambda_2/all"] > 5.0
    assert log[10]["expected_sparsity/all"] < log[30]["expected_sparsity/all"]
    kept = count_prunable(student)
    assert 1 - kept / full == pytest.approx(target, abs=0.08)
    assert log[-1]["sparsity/all"] == pytest.approx(1 - kept / full)
    assert all(isinstance(v, float) and math.isfinite(v) for entry in log for v in entry.values())
    assert strategy.export(student) is student  # already pruned
    assert strategy.regularizer(student, 55) == {} and strategy.param_groups(student) == []


def test_export_prunes_a_copy_when_the_run_ends_before_prune_step(teacher: nn.Module) -> None:
    strategy = INHERITANCE.build({"name": "auto", "prune_step": 1000})
    student = strategy.inherit(None, teacher)
    with torch.no_grad():
        get_masks(student).towers["vision"].neurons.log_alpha[:400] = math.log(0.01)
    assert strategy.on_step(student, 10) is None
    exported = strategy.export(student)
    assert get_masks(student) is not None and get_masks(exported) is None
    assert sum(exported.clip_structure["vision"]["mlp_width"]) < 4 * 256
    assert count_prunable(exported) < count_prunable(student)


def test_per_tower_budget_and_single_tower(teacher: nn.Module) -> None:
    strategy = INHERITANCE.build({"name": "auto", "budget": "per_tower", "towers": "text", "lagrangian": "one_sided"})
    student = strategy.inherit(None, teacher)
    masks = get_masks(student)
    assert list(masks.towers) == ["text"] and set(masks.lagrangians) == {"text"}
    assert masks.lagrangians["text"].lambda_1.item() == 10.0  # TinyCLIP's code: start at 10
    term = strategy.regularizer(student, 1000)["lagrangian"]
    assert term.item() > 0  # target 0.5 after the ramp, nothing pruned yet
    term.backward()
    assert all(p.grad is not None and (p.grad > 0).all() for p in masks.mask_parameters())


def test_target_schedule_replaces_the_linear_ramp() -> None:
    ramped = INHERITANCE.build({"name": "auto", "target_sparsity": 0.4, "prune_step": 100, "ramp_steps": 50})
    assert ramped.schedule(0) == 0.0 and ramped.schedule(25) == pytest.approx(0.2) and ramped.schedule(60) == 0.4
    fixed = INHERITANCE.build({"name": "auto", "target_sparsity": 0.4, "prune_step": 100,
                               "target_schedule": {"name": "constant"}})
    assert [fixed.schedule(s) for s in (0, 25, 99)] == [0.4, 0.4, 0.4]  # base_value is the target
