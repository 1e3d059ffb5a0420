"""Every experiment config shipped in experiments/configs validates (plug-ins, parameters, keys)."""

from pathlib import Path

import pytest

from compress.config import load_config

CONFIGS = sorted((Path(__file__).parent.parent / "experiments" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.name and len(cfg.run_id()) == 12


def test_there_are_shipped_configs():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_only_the_smoke_test_distils_from_a_random_teacher(path):
    from compress.models.factory import has_weights

    cfg = load_config(path)
    if cfg.teacher is None:
        return
    random_teacher = not has_weights(cfg.teacher.model, cfg.teacher.pretrained)
    assert random_teacher == cfg.teacher.random_init == (path.name == "tiny-test.yaml")
