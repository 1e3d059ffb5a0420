"""Every experiment config shipped under experiments/configs (recipes in subfolders too) validates
(plug-ins, parameters, keys) and passes ``clip-compress run CONFIG --dry-run``."""

from pathlib import Path

import pytest

from compress.recipe import load_config, run_id_of
from experiments.cli import main

CONFIG_ROOT = Path(__file__).parent.parent / "experiments" / "configs"
#: run configs; ablations/ (and ablations/web/) holds sweep files and their base, which needs a trained teacher
#: (tested as sweeps in tests/test_ablations.py)
CONFIGS = sorted(p for p in CONFIG_ROOT.rglob("*.yaml") if "ablations" not in p.relative_to(CONFIG_ROOT).parts)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_ROOT)))
def test_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.name and len(run_id_of(cfg)) == 12


def test_there_are_shipped_configs():
    assert len(CONFIGS) >= 3
    names = {str(p.relative_to(CONFIG_ROOT)) for p in CONFIGS}
    assert {"tinyclip/vit-b32-manual.yaml", "tinyclip/vit-b32-auto.yaml", "tinyclip/vit-b32-importance.yaml",
            "tinyclip/vit-b16-manual.yaml",
            "tinyclip/rn50-manual.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_ROOT)))
def test_only_the_smoke_test_distils_from_a_random_teacher(path):
    from compress.models.factory import has_weights

    cfg = load_config(path)
    if cfg.teacher is None:
        return
    random_teacher = not has_weights(cfg.teacher.model, cfg.teacher.pretrained)
    assert random_teacher == cfg.teacher.random_init == (path.name == "tiny-test.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_ROOT)))
def test_shipped_config_passes_the_dry_run(path, tmp_path, capsys):
    """Random weights stand in for pretrained tags (nothing is downloaded); nothing is written."""
    out_dir = tmp_path / "runs"
    assert main(["run", str(path), "--dry-run", "--set", f"output.dir={out_dir}"]) == 0
    out = capsys.readouterr().out
    cfg = load_config(path)
    assert f"plan of {cfg.name} (run id {run_id_of(cfg)})" in out
    assert "MACs per image" in out and "samples" in out
    assert not out_dir.exists()


def test_dry_run_of_the_tinyclip_recipes_gives_the_papers_sizes(capsys):
    """The recipes' students have the parameter counts of the TinyCLIP paper's models, and the automatic chain
    ends at 25% of ViT-B/32's prunable parameters (87.85M + 38.13M)."""
    from compress.plan import build_plan
    from compress.recipe import resolve_stages

    sizes = {}
    for name in ("vit-b32-manual", "vit-b16-manual", "rn50-manual"):
        for stage in build_plan(load_config(CONFIG_ROOT / "tinyclip" / f"{name}.yaml")).stages:
            sizes[stage.name] = (round(stage.student.vision / 1e6, 2), round(stage.student.text / 1e6, 2))
    assert sizes == {"vit61m": (61.41, 28.67), "vit40m": (39.69, 19.22), "vit39m": (38.59, 19.22),
                     "vit8m": (8.28, 2.52), "resnet30m": (29.58, 28.94), "resnet19m": (18.60, 19.48)}
    auto = load_config(CONFIG_ROOT / "tinyclip" / "vit-b32-auto.yaml")
    plan = build_plan(auto)
    assert [s.target_sparsity for s in plan.stages] == [0.25, 0.5, 0.75]
    assert [s.source for s in resolve_stages(auto)] == ["teacher", "previous", "previous"]
    prunable = plan.teacher.prunable
    assert prunable == 87849216 + 38131200
    assert plan.stages[-1].expected_prunable == round(0.25 * prunable)


GOLDEN_DRY_RUNS = Path(__file__).parent / "data" / "dry_runs"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_ROOT)))
def test_dry_run_of_a_shipped_config_is_what_it_was(path, capsys):
    """The plan a shipped config prints is kept in tests/data/dry_runs/ (regenerate one on purpose with
    ``clip-compress run CONFIG --dry-run --set output.dir=/runs > tests/data/dry_runs/NAME.txt``), so a
    refactoring of the engine that changes what a user is told shows here."""
    assert main(["run", str(path), "--dry-run", "--set", "output.dir=/runs"]) == 0
    golden = (GOLDEN_DRY_RUNS / f"{path.stem}.txt").read_text()
    assert capsys.readouterr().out == golden
