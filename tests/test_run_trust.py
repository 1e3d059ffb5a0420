"""What a run promises beyond its numbers: refusals before compute, clean restarts, rows for
every ending (completed, failed, interrupted), readable files, sparsity reporting, progress
output that suits a log file."""

import io
import json
import math
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from compress.config import ConfigError
from compress.models import load_model
from compress.plugins import Inheritance
from compress.progress import LineProgress, progress
from compress.recipe import run_id_of
from compress.run import run_dir_for, run_experiment
from compress.stage import sparsity_metrics
from tests.test_run_e2e import tiny_config

ROOT = Path(__file__).resolve().parents[1]


TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_a_submitit_job_of_several_tasks_exports_torchruns_variables(monkeypatch):
    """One task per GPU under SLURM: the job exports RANK, WORLD_SIZE, ... for compress.distributed
    (it used to refuse); CUDA_VISIBLE_DEVICES stays, each task takes cuda:LOCAL_RANK as under torchrun."""
    from experiments.job import export_task_environment

    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "77", "SLURM_NTASKS": "4", "SLURM_JOB_NUM_NODES": "2",
             "SLURM_NODEID": "1", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[12-13]",
             "CUDA_VISIBLE_DEVICES": "0,1"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    for key in TORCHRUN_VARIABLES:  # set, then removed: monkeypatch removes what the job exports afterwards
        monkeypatch.setenv(key, "unset")
        monkeypatch.delenv(key)
    export_task_environment()
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")}
    assert env == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "gpu12"}
    assert 20000 <= int(os.environ["MASTER_PORT"]) <= 60000 and os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_a_single_task_job_exports_nothing(monkeypatch):
    from experiments.job import export_task_environment

    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    for key in TORCHRUN_VARIABLES:
        monkeypatch.setenv(key, "unset")
        monkeypatch.delenv(key)
    export_task_environment()
    assert not set(TORCHRUN_VARIABLES) & set(os.environ)


def test_a_restarted_run_writes_one_metrics_series(tmp_path):
    cfg = tiny_config(tmp_path)
    run_dir = run_dir_for(cfg)
    run_dir.mkdir(parents=True)
    # what a killed earlier attempt left behind
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    row = run_experiment(cfg)
    assert row["status"] == "completed", row.get("error")
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_wrong_eval_folder_fails_before_training(tmp_path):
    cfg = tiny_config(tmp_path, eval={"zero_shot": [{"name": "imagenet", "kind": "folder",
                                                    "path": str(tmp_path / "no-such-imagenet")}]})
    row = run_experiment(cfg)
    assert row["status"] == "failed"
    assert "no-such-imagenet" in row["error"]
    assert not (run_dir_for(cfg) / "metrics.jsonl").exists()  # it failed before step 1


def test_evaluation_failing_after_training_keeps_training_metrics(tmp_path, monkeypatch):
    import compress.evaluation.run_eval as run_eval

    def broken(*args, **kwargs):
        raise OSError("the evaluation disk went away")

    monkeypatch.setattr(run_eval, "evaluate_prepared", broken)
    cfg = tiny_config(tmp_path)
    row = run_experiment(cfg)
    assert row["status"] == "failed" and "evaluation disk" in row["error"]
    assert row["metrics"]["train/steps"] == 2
    assert Path(row["metrics"]["export/path"]).is_dir()
    on_disk = json.loads((run_dir_for(cfg) / "result.json").read_text())
    assert on_disk["metrics"]["train/steps"] == 2


def test_sparsity_target_and_achieved_are_in_the_row(tmp_path):
    cfg = tiny_config(tmp_path, student=None,
                      train={"steps": 8, "batch_size": 8, "lr": 1e-3, "progress": False, "log_every": 1},
                      inheritance={"name": "auto", "target_sparsity": 0.5, "prune_step": 3, "ramp_steps": 2,
                                   "mask_lr": 0.5, "lambda_lr": 1.0})
    row = run_experiment(cfg)
    assert row["status"] == "completed", row.get("error")
    m = row["metrics"]
    teacher = load_model("cc-test-teacher")
    student = load_model(m["export/path"])
    from compress.models.params import parameter_report

    full, kept = parameter_report(teacher), parameter_report(student)
    expected = 1 - (kept["vision"] + kept["text"]) / (full["vision"] + full["text"])
    assert m["sparsity/target"] == 0.5
    assert m["sparsity/achieved"] == pytest.approx(expected, abs=1e-6)
    assert m["sparsity/missed"] == (abs(expected - 0.5) > 0.02)
    # after pruning at step 3: a new optimizer and cosine decay from the lr of that moment, no warm-up
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (run_dir_for(cfg) / "metrics.jsonl").read_text().splitlines())}
    start = lrs[3]  # the lr of the step that ended with pruning (step index 2)
    for index in range(3, 8):
        assert lrs[index + 1] == pytest.approx(start * 0.5 * (1 + math.cos(math.pi * (index - 3) / 5)), rel=1e-9)


def test_missed_sparsity_target_is_flagged(capsys):
    teacher = load_model("cc-test-teacher")

    class Strategy(Inheritance):  # declares what it prunes to (the engine reads nothing else of it)
        target_parameter = "target_sparsity"
        target_sparsity = 0.5

    out = sparsity_metrics(Strategy(), teacher, teacher)  # nothing pruned
    assert out == {"sparsity/achieved": 0.0, "sparsity/target": 0.5, "sparsity/error": -0.5, "sparsity/missed": True,
                   "sparsity/overshoot": False}


def test_save_checkpoint_false_writes_no_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, output={"dir": str(tmp_path / "runs"), "save_checkpoint": False})
    row = run_experiment(cfg)
    assert row["status"] == "completed", row.get("error")
    assert not (run_dir_for(cfg) / "checkpoints").exists()


def test_run_files_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        cfg = tiny_config(tmp_path)
        row = run_experiment(cfg)
    finally:
        os.umask(old)
    run_dir = run_dir_for(cfg)
    files = [run_dir / "result.json", run_dir / "config.yaml", *Path(row["metrics"]["export/path"]).iterdir()]
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def _write_cli_config(tmp_path, **train):
    cfg = {
        "name": "cli",
        "teacher": {"model": "cc-test-teacher", "random_init": True},
        "student": {"model": "cc-test-student"},
        "inheritance": {"name": "manual"},
        "losses": [{"name": "affinity"}],
        "data": {"train": {"kind": "synthetic", "num_samples": 64}, "val": {"kind": "synthetic", "num_samples": 16}},
        "train": {"steps": 2, "batch_size": 8, "lr": 1e-3, "log_every": 1, **train},
        "eval": {"zero_shot": [{"name": "cs", "kind": "synthetic", "task": "color_shape"}], "throughput": False},
        "output": {"dir": str(tmp_path / "runs")},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_run_prints_its_directory_and_headline_metrics(tmp_path, capsys):
    from experiments.cli import main

    path = _write_cli_config(tmp_path, progress=False)
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    row = json.loads(next((tmp_path / "runs").glob("cli-*/result.json")).read_text())
    assert f"[completed] cli ({row['run_id']})" in out
    assert f"zs/cs/top1 {row['metrics']['zs/cs/top1']:.2f}" in out


def test_slurm_backend_off_cluster_is_one_line(tmp_path, monkeypatch, capsys):
    from experiments.cli import main

    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    path = _write_cli_config(tmp_path)
    assert main(["run", str(path), "--backend", "slurm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sbatch not found" in err[0]


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
@pytest.mark.slow
def test_a_stopped_run_leaves_an_interrupted_row(tmp_path, sig, code):
    path = _write_cli_config(tmp_path, steps=100000, progress=False, log_every=1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    # a shell that started the tests in the background leaves SIGINT ignored, and a child that starts
    # with it ignored never gets Python's KeyboardInterrupt handler: give the child the default
    proc = subprocess.Popen([sys.executable, "-m", "experiments", "run", str(path)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while not list((tmp_path / "runs").glob("cli-*/metrics.jsonl")) and time.time() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    row = json.loads(next((tmp_path / "runs").glob("cli-*/result.json")).read_text())
    assert row["status"] == "interrupted"
    assert ("SIGTERM" in row["error"]) if sig == signal.SIGTERM else row["error"].startswith("KeyboardInterrupt")
    assert "interrupted" in err.splitlines()[-1]


def test_progress_in_a_log_file_writes_a_few_plain_lines():
    stream = io.StringIO()  # not a terminal
    bar = progress(1000, "train", stream=stream)
    assert isinstance(bar, LineProgress)
    for _ in range(1000):
        bar.set_postfix(loss="0.1")
        bar.update(1)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert 10 <= len(lines) <= 21
    assert lines[-1].startswith("[train] 1000/1000") and "loss=0.1" in lines[-1]
    assert "\r" not in stream.getvalue()


def test_verbose_flag_before_or_after_the_command(tmp_path, capsys):
    from experiments.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lrr: 1}\n")
    assert main(["run", str(bad)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    for argv in (["-v", "run", str(bad)], ["run", str(bad), "-v"]):
        with pytest.raises(ConfigError, match="train.lrr"):  # -v: the full traceback
            main(argv)


@pytest.mark.slow
def test_run_job_pickles_and_runs_on_the_local_backend(tmp_path):
    import pickle

    from experiments.dispatch import dispatch
    from experiments.job import RunJob

    cfg = tiny_config(tmp_path)
    again = pickle.loads(pickle.dumps(RunJob(cfg.to_dict())))
    assert run_id_of(again.run_config()) == run_id_of(cfg)
    (row,) = dispatch([cfg], backend="local")
    assert row["status"] == "completed", row.get("error")
    assert (run_dir_for(cfg) / "submitit").is_dir() and (run_dir_for(cfg) / "result.json").is_file()


def test_a_second_process_on_a_running_run_directory_is_refused(tmp_path):
    from compress.rundir import RunDirError, owned_run_dir

    cfg = tiny_config(tmp_path)
    run_dir = run_dir_for(cfg)
    with owned_run_dir(run_dir, run_id_of(cfg)):  # another process holds it (flock is per open file)
        with pytest.raises(RunDirError, match=r"in use by another process \(pid \d+\)"):
            run_experiment(cfg)
        assert not (run_dir / "result.json").exists() and not (run_dir / "config.yaml").exists()
    assert run_experiment(cfg)["status"] == "completed"  # released: the run goes ahead


def test_a_reused_run_name_of_another_config_is_refused(tmp_path, capsys):
    from compress.rundir import RunDirError

    output = {"dir": str(tmp_path / "runs"), "run_name": "shared"}
    first = tiny_config(tmp_path, output=output)
    assert run_experiment(first)["status"] == "completed"
    before = (run_dir_for(first) / "result.json").read_text()
    other = tiny_config(tmp_path, output=output, train={"steps": 3, "batch_size": 8, "lr": 1e-3, "progress": False})
    with pytest.raises(RunDirError, match=f"another config's run \\(run id {run_id_of(first)}"):
        run_experiment(other)
    assert (run_dir_for(first) / "result.json").read_text() == before  # untouched
    assert run_experiment(first)["status"] == "completed"  # its own config may run there again


def test_replacing_a_local_teacher_checkpoint_changes_the_run_id(tmp_path):
    from compress.models import load_model
    from compress.models.export import save_model

    folder = save_model(load_model("cc-test-teacher"), tmp_path / "teacher")
    cfg = lambda: tiny_config(tmp_path, teacher={"model": str(folder)})  # noqa: E731
    first = run_id_of(cfg())
    assert run_id_of(cfg()) == first  # stable while the files are unchanged
    weights = next(p for p in Path(folder).iterdir() if p.suffix == ".safetensors")
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # replaced at the same path
    assert run_id_of(cfg()) != first


def test_replacing_a_stage_students_local_file_changes_the_run_id(tmp_path):
    from compress.models import load_model
    from compress.models.export import save_model

    folder = save_model(load_model("cc-test-student"), tmp_path / "student")
    cfg = lambda: tiny_config(tmp_path, stages=[{"student": {"model": str(folder)}}])  # noqa: E731
    first = run_id_of(cfg())
    weights = next(p for p in Path(folder).iterdir() if p.suffix == ".safetensors")
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert run_id_of(cfg()) != first


def test_a_skipped_run_prints_one_line_and_its_numbers(tmp_path, capsys):
    from experiments.cli import main

    path = _write_cli_config(tmp_path, progress=False)
    assert main(["run", str(path)]) == 0
    capsys.readouterr()
    assert main(["run", str(path)]) == 0  # completed: skipped
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("[skip] cli (") and "[skipped]" not in out
    assert lines[1].startswith("  zs/cs/top1 ")
