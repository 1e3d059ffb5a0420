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
