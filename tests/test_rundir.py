"""The run-directory object (:class:`compress.rundir.RunDir`): the layout and name of a run in one torch-free
module, so that ``status`` of a folder, ``collect`` and ``analysis`` run without torch and ``analysis`` without
``experiments``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from compress.recipe import run_dir_for, run_dir_of, run_id_of
from compress.rundir import (
    CHECKPOINT_DIR,
    CHECKPOINT_FORMAT,
    CHECKPOINT_META_FILE,
    LATEST_FILE,
    RUN_OUTPUTS,
    RunDir,
    find_run_dir,
    run_dir_name,
)

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)


def _row(run_id: str, status: str = "completed", **extra) -> str:
    return json.dumps({"run_id": run_id, "name": "n", "status": status, "config": {"train": {"steps": 9}},
                       "metrics": {"params/vision": 1, "params/text": 2}, **extra})


def _runs(root: Path) -> dict[str, RunDir]:
    """Hand-made run folders: a completed run with its curve, a staged run with two stage rows, and a run killed
    before it logged a line, whose step only its checkpoint knows."""
    done, staged, killed = RunDir(root / "done-a1"), RunDir(root / "staged-b2"), RunDir(root / "killed-c3")
    done.path.mkdir(parents=True)
    done.result.write_text(_row("a1"))
    done.metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    for k, name in enumerate(["first", "second"]):
        stage = staged.stage(f"{k}-{name}")
        stage.path.mkdir(parents=True)
        stage.result.write_text(_row("b2", metrics={"stage/name": name}))
    staged.result.write_text(_row("b2", stage="1-second"))
    checkpoint = killed.checkpoints / "step-00000005"
    checkpoint.mkdir(parents=True)
    (checkpoint / CHECKPOINT_META_FILE).write_text(json.dumps({"format": CHECKPOINT_FORMAT, "run_id": "c3", "step": 5}))
    (killed.checkpoints / LATEST_FILE).write_text("step-00000005\n")
    killed.run_id_file.write_text("c3\n")
    return {"done": done, "staged": staged, "killed": killed}


def test_status_collect_and_analysis_of_run_folders_import_neither_torch_nor_analysis_experiments(tmp_path):
    """``analysis`` reads rows without ``experiments``; ``status`` of a folder (a run whose step only its
    checkpoint holds included), ``collect`` and ``analysis`` never import torch."""
    _runs(tmp_path / "runs")
    out = tmp_path / "rows.jsonl"
    code = (
        "import sys, json\n"
        "from analysis.load import load_curves, load_results\n"
        f"frame = load_results([{str(tmp_path / 'runs')!r}])\n"
        f"curves = load_curves([{str(tmp_path / 'runs')!r}])\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] == 'experiments')\n"
        "from experiments.status import status\n"
        "from experiments.collect import collect\n"
        f"states = {{s.run_dir.name: (s.state, s.step) for s in status({str(tmp_path / 'runs')!r})}}\n"
        f"n = collect([{str(tmp_path / 'runs')!r}], {str(out)!r})\n"
        "print(json.dumps({'rows': len(frame), 'curve': len(curves), 'leaked': leaked, 'states': states, 'n': n,"
        " 'torch': 'torch' in sys.modules}))\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["leaked"] == [] and report["torch"] is False
    assert report["states"] == {"done-a1": ["completed", 2], "killed-c3": ["stopped", 5],
                                "staged-b2": ["completed", None]}
    assert (report["rows"], report["n"], report["curve"]) == (4, 4, 2)


def test_the_torch_free_modules_import_without_torch():
    """The run directory, the rows, the manifest, sweep expansion's module, status and collect, and analysis."""
    modules = ["compress.rundir", "compress.results", "experiments.manifest", "experiments.sweep",
               "experiments.status", "experiments.collect", "analysis.load", "analysis.tables", "analysis.plots"]
    result = _python(f"import sys, {', '.join(modules)}; sys.exit(3 if 'torch' in sys.modules else 0)")
    assert result.returncode == 0, result.stderr


def test_layout_stage_order_and_outputs(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.stage(None) == run and run.stage("2-b").path == tmp_path / "r" / "stages" / "2-b"
    assert run.stage("2-b").stage_of() == run and run.stage_of() is None
    assert (run.config.name, run.metrics.name, run.result.name, run.checkpoints.name, run.model.name) == (
        "config.yaml", "metrics.jsonl", "result.json", CHECKPOINT_DIR, "model")
    assert run.stages() == [] and not run.is_run()
    for name in ["10-last", "2-second", "0-first", "notes"]:
        (run.stages_root / name).mkdir(parents=True)
    assert [s.name for s in run.stages()] == ["0-first", "2-second", "10-last"]  # by index, not by text
    assert [p.name for p in run.outputs()] == list(RUN_OUTPUTS)
    assert run.checkpoint_step() is None
    run.checkpoints.mkdir()
    (run.checkpoints / LATEST_FILE).write_text("step-00000003\n")  # names a folder that is not there
    assert run.checkpoint_step() is None
    (run.checkpoints / "step-00000003").mkdir()
    (run.checkpoints / "step-00000003" / CHECKPOINT_META_FILE).write_text('{"format": "other/1", "step": 3}')
    assert run.checkpoint_step() is None  # not a checkpoint of ours, as latest_checkpoint refuses it
    (run.checkpoints / "step-00000003" / CHECKPOINT_META_FILE).write_text(json.dumps(
        {"format": CHECKPOINT_FORMAT, "step": 3}))
    assert run.checkpoint_step() == 3
    run.config.write_text("name: r\n")
    assert run.is_run()


def test_run_dir_name_is_found_by_its_run_id(tmp_path):
    from tests.test_run_e2e import tiny_config

    cfg = tiny_config(tmp_path, name="tiny")
    assert run_dir_of(cfg).path == run_dir_for(cfg) == Path(cfg.output.dir) / f"tiny-{run_id_of(cfg)}"
    assert run_dir_name("abl", "0123abcd", "lr=0.1_seed=1") == "abl-lr=0.1_seed=1-0123abcd"
    assert find_run_dir(tmp_path / "out", "0123abcd") is None
    (tmp_path / "out" / run_dir_name("abl", "0123abcd", "lr=0.1")).mkdir(parents=True)
    assert find_run_dir(tmp_path / "out", "0123abcd") == tmp_path / "out" / "abl-lr=0.1-0123abcd"
    (tmp_path / "out" / run_dir_name("abl", "0123abcd")).mkdir()
    assert find_run_dir(tmp_path / "out", "0123abcd") is None  # two candidates: none is chosen


def test_task_list_results_are_a_run_output_and_the_final_model_is_found_in_one_place(tmp_path: Path) -> None:
    """``RUN_DIR/eval/`` (task-list results of the run's model) is removed by ``--force`` with the model;
    :func:`final_model` refuses an unfinished run and a completed run without its model, and finds a staged
    run's last stage's; :func:`model_sha256` changes with the weights."""
    import pytest

    from compress.rundir import RUN_EVAL_DIR, RunModelError, final_model, model_sha256

    assert RUN_EVAL_DIR == "eval" and RUN_EVAL_DIR in RUN_OUTPUTS
    run = RunDir(tmp_path / "run")
    assert run.eval_dir in run.outputs()
    run.path.mkdir()
    with pytest.raises(RunModelError, match="did not complete \\(no result.json\\)"):
        final_model(run.path)
    run.result.write_text(json.dumps({"status": "failed"}))
    with pytest.raises(RunModelError, match="did not complete \\(status: failed\\)"):
        final_model(run.path)
    run.result.write_text(json.dumps({"status": "completed"}))
    with pytest.raises(RunModelError, match="has no exported model \\(model/\\)"):
        final_model(run.path)
    last = run.stage("1-second").model
    last.mkdir(parents=True)
    run.stage("0-first").model.mkdir(parents=True)
    assert final_model(run.path) == last
    assert model_sha256(last) is None  # no weight files
    (last / "open_clip_config.json").write_text("{}")
    (last / "open_clip_model.safetensors").write_bytes(b"abc")
    first = model_sha256(last)
    (last / "open_clip_config.json").write_text('{"x": 1}')  # not a weight file
    assert model_sha256(last) == first and len(first) == 64
    (last / "open_clip_model.safetensors").write_bytes(b"abd")
    assert model_sha256(last) != first
    assert model_sha256(last / "open_clip_model.safetensors") is not None and model_sha256("ViT-B-32") is None
