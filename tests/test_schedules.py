import math

import pytest

from compress.registry import SCHEDULES


def test_warmup_cosine_values():
    s = SCHEDULES.build({"name": "warmup_cosine", "warmup_steps": 4}, context={"base_value": 2.0, "total_steps": 14})
    assert [s(i) for i in range(4)] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    # cosine over the 10 steps after warm-up
    for step in range(4, 15):
        expected = 2.0 * 0.5 * (1 + math.cos(math.pi * (step - 4) / 10))
        assert s(step) == pytest.approx(expected)
    assert s(100) == pytest.approx(0.0)


def test_linear_ramp():
    s = SCHEDULES.build({"name": "linear_ramp", "end": 0.5, "steps": 10, "delay": 2})
    assert s(0) == s(2) == 0.0
    assert s(7) == pytest.approx(0.25)
    assert s(12) == s(1000) == pytest.approx(0.5)


def test_stages_validation_and_values():
    s = SCHEDULES.build({"name": "stages", "targets": [0.25, 0.5, 0.75]})
    assert [s(k) for k in range(4)] == [0.25, 0.5, 0.75, 0.75]
    with pytest.raises(ValueError, match="must not decrease"):
        SCHEDULES.build({"name": "stages", "targets": [0.5, 0.25]})


def test_step_decay_and_constant():
    s = SCHEDULES.build({"name": "step_decay", "milestones": [2, 4], "gamma": 0.5}, context={"base_value": 1.0})
    assert [s(i) for i in range(6)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    assert SCHEDULES.build("constant", context={"base_value": 3.0})(7) == 3.0


CONST = {"name": "constant"}
LR = {"name": "warmup_cosine", "warmup_steps": 0}


def weight_config(schedules, losses=None):
    from compress.recipe import config_from_dict

    losses = losses or [{"name": "affinity", "weight": 1.0}, {"name": "clip", "weight": 0.25}]
    return config_from_dict({
        "name": "w", "teacher": {"model": "cc-test-teacher", "random_init": True},
        "student": {"model": "cc-test-student"},
        "losses": losses, "schedules": {"lr": LR, **schedules}, "train": {"steps": 10},
    })


def test_loss_weight_schedules_reach_the_loss_terms():
    """schedules.weight/<loss>: a schedule plug-in whose base_value is the loss's configured weight."""
    from compress.models import load_model
    from compress.recipe import build_losses

    cfg = weight_config({"weight/clip": CONST, "weight/0": {"name": "linear_ramp", "end": 2.0, "steps": 4}})
    terms = build_losses(cfg, load_model("cc-test-student"), load_model("cc-test-teacher"))
    assert [t.weight_at(2) for t in terms] == [1.0, 0.25]  # ramp 0 -> 2 over 4 steps; constant = base weight
    assert [t.weight_at(0) for t in terms] == [0.0, 0.25] and terms[0].weight_at(9) == 2.0
    plain = build_losses(weight_config({}), load_model("cc-test-student"), load_model("cc-test-teacher"))
    assert [t.schedule for t in plain] == [None, None] and [t.weight_at(3) for t in plain] == [1.0, 0.25]


def test_unknown_schedule_keys_are_refused_with_the_valid_keys():
    from compress.config import ConfigError

    with pytest.raises(ConfigError, match=r"schedules.weight/afinity: unknown schedule key. Did you mean "
                                          r"'weight/affinity'.*\? Valid keys: lr, weight/affinity, weight/clip, "
                                          r"weight/<loss index>"):
        weight_config({"weight/afinity": CONST})
    with pytest.raises(ConfigError, match=r"schedules.target_sparsity: unknown schedule key"):
        weight_config({"target_sparsity": CONST})
    with pytest.raises(ConfigError, match=r"schedules.weight/7: unknown schedule key"):
        weight_config({"weight/7": CONST})
    with pytest.raises(ConfigError, match=r"schedules.weight/clip.*no parameter 'stop'"):
        weight_config({"weight/clip": {"name": "linear_ramp", "end": 1.0, "stop": 3}})


def test_shared_loss_names_are_addressed_by_index():
    from compress.config import ConfigError

    two = [{"name": "clip", "weight": 1.0}, {"name": "clip", "weight": 0.5}]
    cfg = weight_config({"weight/1": CONST}, losses=two)
    assert "weight/1" in cfg.schedules
    with pytest.raises(ConfigError, match=r"schedules.weight/clip: two losses share that name: address one by index"):
        weight_config({"weight/clip": CONST}, losses=two)
    with pytest.raises(ConfigError, match=r"schedules.weight/1: losses\[1\] already has a schedule"):
        weight_config({"weight/clip": CONST, "weight/1": CONST})
