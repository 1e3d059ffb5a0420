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
