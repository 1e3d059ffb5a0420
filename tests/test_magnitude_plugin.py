"""An importance-ranked inheritance added in its own file, without touching the engine (issue 17): the test
plug-in :mod:`tests.plugins.magnitude_inheritance` prunes by weight magnitude to a target; it runs in a staged run
with cumulative targets, resumes exactly after a stop, and shows in ``--dry-run``."""

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from compress.models import load_model
from compress.models.params import prunable_count
from compress.plan import build_plan, format_plan
from compress.registry import INHERITANCE
from compress.run import run_dir_for, run_experiment
from tests.plugins.magnitude_inheritance import MagnitudeInheritance
from tests.test_resume import TRAIN, Stop, assert_same, kill_and_resume, outcome, stop_at
from tests.test_run_e2e import tiny_config

NO_EVAL = {"zero_shot": [], "retrieval": False, "throughput": False, "macs": False}
ROOT = Path(__file__).resolve().parents[1]
#: ``clip-compress run CONFIG`` in a process of its own, with the plug-in registered first (as an entry point would)
RUN_WITH_PLUGIN = (
    "import sys\n"
    "from compress.registry import INHERITANCE\n"
    "from tests.plugins.magnitude_inheritance import MagnitudeInheritance\n"
    "INHERITANCE.register('magnitude')(MagnitudeInheritance)\n"
    "from experiments.cli import main\n"
    "sys.exit(main(['run', sys.argv[1]]))\n"
)


@pytest.fixture(autouse=True)
def magnitude():
    """Registered by the test, as a third-party package would register it through its entry point."""
    with INHERITANCE.scoped():
        INHERITANCE.register("magnitude")(MagnitudeInheritance)
        yield


def staged(tmp_path, out="runs", **extra):
    return tiny_config(tmp_path, inheritance={"name": "magnitude"}, student=None, stages={"targets": [0.2, 0.4]},
                       train=TRAIN, eval=NO_EVAL, output={"dir": str(tmp_path / out)}, **extra)


def test_a_staged_run_prunes_by_magnitude_to_the_cumulative_targets(tmp_path):
    cfg = staged(tmp_path)
    row = run_experiment(cfg)
    assert row["status"] == "completed", row.get("error")
    run_dir = run_dir_for(cfg)
    first = json.loads((run_dir / "stages" / "0-sparsity20" / "result.json").read_text())
    last = json.loads((run_dir / "stages" / "1-sparsity40" / "result.json").read_text())
    assert abs(first["metrics"]["sparsity/achieved"] - 0.2) <= 0.01
    assert last["metrics"]["sparsity/target"] == 0.4
    assert abs(last["metrics"]["sparsity/achieved"] - 0.4) <= 0.01 and last["metrics"]["sparsity/missed"] is False
    # the stage's own share went to the parameter the plug-in declared, computed from stage 0's achieved size
    share = last["config"]["inheritance"]["sparsity"]
    assert "target_sparsity" not in last["config"]["inheritance"]
    assert share == pytest.approx(1 - 0.6 / (1 - first["metrics"]["sparsity/achieved"]), abs=1e-6)
    teacher, final = load_model("cc-test-teacher"), load_model(last["metrics"]["export/path"])
    assert 1 - prunable_count(final) / prunable_count(teacher) == pytest.approx(last["metrics"]["sparsity/achieved"],
                                                                                abs=1e-6)


@pytest.mark.slow
def test_a_staged_magnitude_run_stopped_in_its_second_stage_resumes_exactly(tmp_path, monkeypatch, capsys):
    straight = staged(tmp_path, out="straight")
    assert run_experiment(straight)["status"] == "completed"
    cfg = staged(tmp_path)
    with monkeypatch.context() as patch:
        stop_at(patch, "1-sparsity40", 5)
        with pytest.raises(Stop):
            run_experiment(cfg)
    record = json.loads((run_dir_for(cfg) / "stages" / "1-sparsity40" / "checkpoints" / "step-00000004" /
                         "student.json").read_text())
    assert record["structure"]["vision"]["mlp_width"] != record["structure"]["vision"]["full"]["mlp_width"]
    assert run_experiment(cfg)["status"] == "completed"
    assert "(step 4 of 7)" in capsys.readouterr().err
    assert_same(outcome(run_dir_for(cfg)), outcome(run_dir_for(straight)))


def test_the_dry_run_shows_the_plugins_text_and_targets(tmp_path, capsys):
    cfg = staged(tmp_path)
    text = format_plan(build_plan(cfg))
    assert "student      the teacher pruned once by weight magnitude (the heads and MLP neurons of largest" in text
    assert "student      stage 0 (sparsity20)'s exported student pruned once by weight magnitude" in text
    assert "target       20.0% of the teacher's prunable parameters removed (cumulative)" in text
    assert ("target       40.0% of the teacher's prunable parameters removed (cumulative); this stage removes "
            "25.0% of its source") in text
    assert "inheritance  magnitude\n" in text  # the stage's own share is in the target line, not here
    from experiments.cli import main

    path = tmp_path / "magnitude.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["run", str(path), "--dry-run"]) == 0
    assert "pruned once by weight magnitude" in capsys.readouterr().out


@pytest.mark.slow
def test_sigkill_in_the_second_magnitude_stage_then_the_same_command_resumes_exactly(tmp_path):
    """A real process, killed with SIGKILL in its second stage (after a checkpoint of that stage), then started
    again with the same command: the same weights, metrics series and rows as a run never stopped."""
    train = {"steps": 30, "batch_size": 8, "lr": 1e-3, "log_every": 1, "progress": False, "checkpoint_every": 3}
    runs = {}
    for out in ("straight", "killed"):
        cfg = tiny_config(tmp_path, name="kill", inheritance={"name": "magnitude"}, student=None,
                          stages={"targets": [0.2, 0.4]}, train=train, eval=NO_EVAL,
                          output={"dir": str(tmp_path / out)})
        runs[out] = tmp_path / f"{out}.yaml"
        runs[out].write_text(yaml.safe_dump(cfg.to_dict()))
    kill_and_resume([sys.executable, "-c", RUN_WITH_PLUGIN],
                    {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}, runs, tmp_path, 30)
