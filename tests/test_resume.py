"""Exact resume: a run stopped at any moment and started again ends exactly as an uninterrupted one."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from compress.checkpoint import CheckpointError, latest_checkpoint
from compress.recipe import run_id_of
from compress.run import run_dir_for, run_experiment
from compress.step_timer import is_timing_key
from compress.train import Trainer
from tests.test_run_e2e import tiny_config

ROOT = Path(__file__).resolve().parents[1]
#: result metrics that measure time, not what was computed
TIMING = ("duration", "per_s", "throughput")

AUTO = {"name": "auto", "prune_step": 4, "ramp_steps": 2, "mask_lr": 0.3, "lambda_lr": 1.0, "round_to": 1}
TRAIN = {"steps": 7, "batch_size": 8, "lr": 1e-3, "log_every": 1, "progress": False, "checkpoint_every": 2}

CASES = {
    # name: (config overrides, (stage folder or None, the step at which the first attempt is stopped))
    "manual": ({}, (None, 3)),
    "auto-masked": ({"inheritance": AUTO, "student": None}, (None, 3)),
    "auto-pruned": ({"inheritance": AUTO, "student": None}, (None, 5)),  # resumed after pruning, cosine from 4
    "projector-accum-clip": (
        {"teacher": {"model": "cc-test-rn-teacher", "random_init": True}, "inheritance": {"name": "none"},
         "losses": [{"name": "feature_distill"}, {"name": "clip", "weight": 0.5}],  # a 32 -> 64 projector
         "train": {**TRAIN, "accum_steps": 2}},
        (None, 5),
    ),
    "two-stages": ({"inheritance": AUTO, "student": None, "stages": {"targets": [0.25, 0.5]}}, ("1-sparsity50", 3)),
}


def config(tmp_path, name, out="runs", **extra):
    overrides, _ = CASES[name]
    return tiny_config(tmp_path, **{"train": TRAIN, "output": {"dir": str(tmp_path / out)}, **overrides, **extra})


class Stop(KeyboardInterrupt):
    """Stands in for a kill between two steps."""


def stop_at(monkeypatch, folder: str | None, step: int) -> None:
    original = Trainer.train_step

    def train_step(self, batch, at):
        if at == step and (folder is None or self.run_dir.name == folder):
            raise Stop(f"stopped at step {at}")
        return original(self, batch, at)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def outcome(run_dir: Path) -> dict:
    """The final weights, the metrics series and the result metrics of a run (timings left out)."""
    row = json.loads((run_dir / "result.json").read_text())
    assert row["status"] == "completed", row.get("error")
    model = Path(row["metrics"]["export/path"])
    weights = load_file(str(next(model.glob("*.safetensors"))))
    series = {}
    for path in sorted(run_dir.rglob("metrics.jsonl")):
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        series[str(path.relative_to(run_dir))] = [{k: v for k, v in r.items() if not is_timing_key(k)} for r in lines]
    metrics = {k: v for k, v in row["metrics"].items() if not any(t in k for t in TIMING) and k != "export/path"}
    return {"weights": weights, "series": series, "metrics": metrics}


def assert_same(a: dict, b: dict) -> None:
    assert a["weights"].keys() == b["weights"].keys()
    for key, value in a["weights"].items():
        assert torch.equal(value, b["weights"][key]), key
    assert a["series"] == b["series"]
    assert a["metrics"] == b["metrics"]


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.slow
def test_a_stopped_run_resumes_to_exactly_the_uninterrupted_result(tmp_path, monkeypatch, name, capsys):
    straight = config(tmp_path, name, out="straight")
    assert run_experiment(straight)["status"] == "completed"

    cfg = config(tmp_path, name)
    folder, step = CASES[name][1]
    with monkeypatch.context() as patch:
        stop_at(patch, folder, step)
        with pytest.raises(Stop):
            run_experiment(cfg)
    run_dir = run_dir_for(cfg)
    assert json.loads((run_dir / "result.json").read_text())["status"] == "interrupted"
    checkpoint = latest_checkpoint(run_dir / "stages" / folder if folder else run_dir)
    assert checkpoint is not None and checkpoint.step == step - step % 2
    row = run_experiment(cfg)
    assert row["status"] == "completed", row.get("error")
    assert f"(step {checkpoint.step} of 7)" in capsys.readouterr().err
    assert_same(outcome(run_dir), outcome(run_dir_for(straight)))
    assert not list(run_dir.rglob("checkpoints"))  # removed once the run completed


def kill_at_checkpoint(command: list[str], env: dict[str, str], root: Path, stage_glob: str, step: int):
    """Start ``command`` (a run) and SIGKILL it as soon as the stage folder ``root/stage_glob`` holds a checkpoint
    of at least ``step``; returns that (the latest) checkpoint. Fails if the run ends before it is killed."""
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, stage = time.monotonic() + 600, None
    try:
        while time.monotonic() < deadline and process.poll() is None:
            stage = next(root.glob(stage_glob), None)
            try:
                checkpoint = latest_checkpoint(stage) if stage is not None else None
            except CheckpointError:  # read while the writer replaced it: look again
                checkpoint = None
            if checkpoint is not None and checkpoint.step >= step:
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        if process.poll() is None:  # killed above, or the test is failing: never leave it training
            process.kill()
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    return latest_checkpoint(stage)


def kill_and_resume(command: list[str], env: dict[str, str], runs: dict[str, Path], root: Path, steps: int,
                    on_kill=None):
    """``command`` on ``runs["straight"]`` to its end; on ``runs["killed"]`` SIGKILLed once its second stage holds a
    checkpoint of step 3 (``on_kill(checkpoint)`` then checks it), then the same command again: it resumes at that
    step (of the stage's ``steps``) and ends as the straight run (weights, metrics series, rows). Run folders are
    ``root/straight/kill-*`` and ``root/killed/kill-*``; returns the checkpoint it was killed at."""
    done = subprocess.run([*command, str(runs["straight"])], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    killed_at = kill_at_checkpoint([*command, str(runs["killed"])], env, root / "killed", "*/stages/1-*", 3)
    if on_kill is not None:
        on_kill(killed_at)
    again = subprocess.run([*command, str(runs["killed"])], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming" in again.stderr and f"step {killed_at.step} of {steps}" in again.stderr
    (straight_dir,) = (root / "straight").glob("kill-*")
    (killed_dir,) = (root / "killed").glob("kill-*")
    assert_same(outcome(killed_dir), outcome(straight_dir))
    return killed_at


@pytest.mark.slow
def test_sigkill_mid_masked_stage_then_the_same_command_resumes_exactly(tmp_path):
    """A real process, killed with SIGKILL in the masked phase of its second stage (after a checkpoint
    of that stage), then started again with the same command: the same weights and metrics as a run
    that was never stopped."""
    auto = {**AUTO, "prune_step": 24, "ramp_steps": 10}
    data = {
        "name": "kill", "teacher": {"model": "cc-test-teacher", "random_init": True}, "inheritance": auto,
        "losses": [{"name": "affinity"}],
        "data": {"train": {"kind": "synthetic", "num_samples": 64}, "val": {"kind": "synthetic", "num_samples": 16}},
        "train": {"steps": 30, "batch_size": 8, "lr": 1e-3, "log_every": 1, "progress": False,
                  "checkpoint_every": 3},
        "eval": {"zero_shot": [], "throughput": False, "batch_size": 16},
        "stages": {"targets": [0.2, 0.4]},
    }
    runs = {}
    for out in ("straight", "killed"):
        path = tmp_path / f"{out}.yaml"
        path.write_text(yaml.safe_dump({**data, "output": {"dir": str(tmp_path / out)}}))
        runs[out] = path
    def still_masked(killed_at) -> None:
        assert killed_at.step < 24  # the masks were still attached
        assert json.loads(killed_at.path.joinpath("student.json").read_text())["masked"] is True

    kill_and_resume([sys.executable, "-m", "experiments", "run"], {**os.environ, "HF_HUB_OFFLINE": "1"}, runs,
                    tmp_path, 30, still_masked)


@pytest.mark.slow
def test_a_torn_checkpoint_write_leaves_the_previous_checkpoint_in_use(tmp_path, monkeypatch, capsys):
    import compress.models.export as export

    straight = config(tmp_path, "auto-masked", out="straight")
    assert run_experiment(straight)["status"] == "completed"
    cfg = config(tmp_path, "auto-masked")
    run_dir = run_dir_for(cfg)
    calls = []
    original = export.save_safetensors

    def dies_on_the_second_checkpoint(state, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            original(state, path, metadata)  # the weights are written, the rest of the folder is not
            raise Stop("killed while writing a checkpoint")
        return original(state, path, metadata)

    with monkeypatch.context() as patch:
        patch.setattr(export, "save_safetensors", dies_on_the_second_checkpoint)
        with pytest.raises(Stop):
            run_experiment(cfg)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    assert [p.name for p in (run_dir / "checkpoints").glob(".tmp-step-00000004-*")]  # the torn folder
    assert latest_checkpoint(run_dir).step == 2
    row = run_experiment(cfg)
    assert row["status"] == "completed", row.get("error")
    assert "(step 2 of 7)" in capsys.readouterr().err
    assert_same(outcome(run_dir), outcome(run_dir_for(straight)))


def interrupted(tmp_path, monkeypatch, name="manual", **extra):
    cfg = config(tmp_path, name, **extra)
    with monkeypatch.context() as patch:
        stop_at(patch, None, 3)
        with pytest.raises(Stop):
            run_experiment(cfg)
    return cfg


def test_another_runs_checkpoint_is_refused_with_a_clear_message(tmp_path, monkeypatch):
    other = interrupted(tmp_path, monkeypatch, out="other")
    cfg = config(tmp_path, "manual", train={**TRAIN, "lr": 5e-4})  # another run (another id)
    run_dir = run_dir_for(cfg)
    run_dir.mkdir(parents=True)
    shutil.copytree(run_dir_for(other) / "checkpoints", run_dir / "checkpoints")
    with pytest.raises(CheckpointError, match=f"belongs to run {run_id_of(other)}, not to this run"):
        run_experiment(cfg)
    assert not (run_dir / "metrics.jsonl").exists()  # refused before anything ran
    # the command line prints it as one line
    from experiments.cli import main

    path = tmp_path / "other-lr.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["run", str(path)]) == 2


def test_a_checkpoint_of_another_config_version_is_refused(tmp_path, monkeypatch):
    cfg = interrupted(tmp_path, monkeypatch)
    meta = latest_checkpoint(run_dir_for(cfg)).path / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "config_sha": "0" * 64}))
    with pytest.raises(CheckpointError, match="written under another config"):
        run_experiment(cfg)


def test_force_starts_again_from_step_zero(tmp_path, monkeypatch, capsys):
    cfg = interrupted(tmp_path, monkeypatch)
    capsys.readouterr()
    row = run_experiment(cfg, force=True)
    assert row["status"] == "completed"
    assert "resuming" not in capsys.readouterr().err
    steps = [json.loads(line)["step"] for line in (run_dir_for(cfg) / "metrics.jsonl").open()]
    assert steps == list(range(1, 8))


def test_resume_after_pruning_rebuilds_the_student_from_its_record_alone(tmp_path, monkeypatch):
    from strategies.inheritance.auto import AutoInheritance

    cfg = config(tmp_path, "auto-pruned")
    with monkeypatch.context() as patch:
        stop_at(patch, None, 5)
        with pytest.raises(Stop):
            run_experiment(cfg)
    checkpoint = latest_checkpoint(run_dir_for(cfg))
    record = checkpoint.student_record()
    from compress.models import load_model
    from compress.models.structure import describe_structure

    full = describe_structure(load_model("cc-test-teacher"))
    assert record["masked"] is False and record["structure"] != full  # pruned: its own shapes
    # the files hold tensors and plain data only
    assert isinstance(torch.load(checkpoint.path / "state.pt", weights_only=True)["trainer"]["step"], int)

    def no_strategy_code(self, student, source):
        raise AssertionError("the pruned student must be rebuilt from its record, not by the strategy")

    monkeypatch.setattr(AutoInheritance, "inherit", no_strategy_code)
    assert run_experiment(cfg)["status"] == "completed"


@pytest.mark.parametrize(
    ("output", "kept"),
    [({}, None), ({"keep_every": 4}, None), ({"keep_checkpoints": True}, ["step-00000007"]),
     ({"keep_checkpoints": True, "keep_every": 4}, ["step-00000004", "step-00000007"])],
)
def test_which_checkpoints_are_kept(tmp_path, output, kept):
    cfg = config(tmp_path, "manual", output={"dir": str(tmp_path / "runs"), **output})
    assert run_experiment(cfg)["status"] == "completed"
    root = run_dir_for(cfg) / "checkpoints"
    if kept is None:
        assert not root.exists()
    else:
        assert sorted(p.name for p in root.iterdir() if p.is_dir()) == kept


def test_no_checkpoint_is_written_when_save_checkpoint_is_false(tmp_path, monkeypatch):
    cfg = interrupted(tmp_path, monkeypatch, output={"dir": str(tmp_path / "runs"), "save_checkpoint": False})
    assert latest_checkpoint(run_dir_for(cfg)) is None
    from compress.config import ConfigError

    for keep in ({"keep_every": 2}, {"keep_checkpoints": True}):  # nothing to keep: refused, not ignored
        with pytest.raises(ConfigError, match="output.save_checkpoint is false"):
            config(tmp_path, "manual", output={"dir": str(tmp_path), "save_checkpoint": False, **keep})


def test_a_staged_run_keeping_every_kth_checkpoint_resumes_after_a_completed_stage(tmp_path, monkeypatch):
    straight = config(tmp_path, "two-stages", out="straight")
    assert run_experiment(straight)["status"] == "completed"
    cfg = config(tmp_path, "two-stages", output={"dir": str(tmp_path / "runs"), "keep_every": 2})
    with monkeypatch.context() as patch:
        stop_at(patch, "1-sparsity50", 3)
        with pytest.raises(Stop):
            run_experiment(cfg)
    run_dir = run_dir_for(cfg)
    assert not (run_dir / "stages" / "0-sparsity25" / "checkpoints").exists()  # the stage completed
    assert sorted(p.name for p in (run_dir / "stages" / "1-sparsity50" / "checkpoints").glob("step-*")) == [
        "step-00000002"]
    assert run_experiment(cfg)["status"] == "completed"
    assert_same(outcome(run_dir), outcome(run_dir_for(straight)))


def test_a_requeued_submitit_job_resumes_and_never_forces(tmp_path, monkeypatch, capsys):
    from experiments.job import RunJob

    cfg = config(tmp_path, "manual")
    job = RunJob(cfg.to_dict(), force=True)
    with monkeypatch.context() as patch:
        stop_at(patch, None, 3)
        with pytest.raises(Stop):
            job()
    requeued = job.checkpoint()  # what submitit calls on preemption or timeout
    again = requeued.function
    assert isinstance(again, RunJob) and again.force is False and again.config == cfg.to_dict()
    capsys.readouterr()
    assert again()["status"] == "completed"
    assert "(step 2 of 7)" in capsys.readouterr().err


def test_a_checkpoint_written_in_another_precision_is_not_resumed_silently(tmp_path, monkeypatch):
    cfg = interrupted(tmp_path, monkeypatch)
    meta = latest_checkpoint(run_dir_for(cfg)).path / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "precision": "bf16"}))  # as on a GPU
    row = run_experiment(cfg)
    assert row["status"] == "failed"
    assert "written in bf16, this attempt resolves train.precision to fp32" in row["error"]
