"""A stop signal (SLURM's SIGUSR2 before a preemption or the time limit, SIGTERM) ends training after the step in
progress with a checkpoint of that step and an ``interrupted`` row; under submitit the job is requeued only then,
and the restarted run ends exactly as a run that was never stopped (compress.stopping)."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from compress.checkpoint import latest_checkpoint
from compress.recipe import config_from_dict, load_config, run_id_of
from compress.run import run_dir_for, run_experiment
from compress.stopping import RunInterrupted, StoppedAtStep
from compress.train import Trainer
from tests.test_ddp import spawn_and_join
from tests.test_resume import assert_same, config, outcome

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
JOB_ID = "4242"

#: two stages, the second one masked while it is stopped; no periodic checkpoint: the stop's is the only one
STAGED = {
    "name": "preempt", "teacher": {"model": "cc-test-teacher", "random_init": True},
    "inheritance": {"name": "auto", "prune_step": 16, "ramp_steps": 6, "mask_lr": 0.3, "lambda_lr": 1.0, "round_to": 1},
    "losses": [{"name": "affinity"}],
    "data": {"train": {"kind": "synthetic", "num_samples": 64}, "val": {"kind": "synthetic", "num_samples": 16}},
    "train": {"steps": 24, "batch_size": 8, "lr": 1e-3, "log_every": 1, "progress": False, "checkpoint_every": 1000},
    "eval": {"zero_shot": [], "throughput": False, "batch_size": 16},
    "stages": {"targets": [0.2, 0.4]},
}


def write_config(tmp_path: Path, out: str, workers: int = 0) -> Path:
    """The staged config (``workers`` loader processes: not part of the run id, the same samples)."""
    path = tmp_path / f"{out}.yaml"
    data = {**STAGED["data"], "num_workers": workers}
    path.write_text(yaml.safe_dump({**STAGED, "data": data, "output": {"dir": str(tmp_path / out)}}))
    return path


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    """The staged run, never stopped (a real process)."""
    tmp = tmp_path_factory.mktemp("straight")
    done = subprocess.run([sys.executable, "-m", "experiments", "run", str(write_config(tmp, "straight"))], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    (run_dir,) = (tmp / "straight").glob("preempt-*")
    return outcome(run_dir)


def steps_done(stage: Path) -> int:
    """The optimizer steps a stage has logged (log_every 1: one line per finished step)."""
    try:
        return sum(1 for line in (stage / "metrics.jsonl").read_text().splitlines() if line.endswith("}"))
    except FileNotFoundError:
        return 0


def signal_mid_stage_1(process: subprocess.Popen, out: Path, signum: int, group: bool = False) -> tuple[Path, int]:
    """Send ``signum`` once the second stage has finished 3 steps (to its whole process group with ``group``, as
    SLURM signals every process of a job step); returns the stage folder and the steps it had finished before."""
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and process.poll() is None:
            stage = next(out.glob("*/stages/1-*"), None)
            done = steps_done(stage) if stage is not None else 0
            if done >= 3:
                if group:
                    os.killpg(process.pid, signum)
                else:
                    process.send_signal(signum)
                process.wait(timeout=300)
                return stage, done
            time.sleep(0.005)
    finally:
        if process.poll() is None:  # the test is failing: never leave it training
            process.kill()
            process.wait(timeout=60)
    raise AssertionError(f"the run ended before it could be signalled (exit {process.returncode})")


def assert_stopped_at_one_step(stage: Path, run_dir: Path, before: int) -> int:
    """The stop's checkpoint holds every step finished before the signal (the step in progress at most is lost,
    and no step ran after it) and both rows say interrupted at that step."""
    checkpoint = latest_checkpoint(stage)
    assert checkpoint is not None, "no checkpoint was written on the signal"
    assert before <= checkpoint.step <= before + 2  # + the steps that may end between the count and the delivery
    assert steps_done(stage) == checkpoint.step  # nothing ran after the checkpoint
    for folder in (run_dir, stage):
        row = json.loads((folder / "result.json").read_text())
        assert row["status"] == "interrupted" and row["step"] == checkpoint.step, row.get("error")
    return checkpoint.step


@pytest.mark.slow
def test_sigusr2_under_submitit_checkpoints_writes_the_row_then_requeues_and_resumes_exactly(tmp_path, straight):
    """A real submitit job process (submitit's SLURM job environment, a fake ``scontrol``) gets SIGUSR2 in its
    second stage: the checkpoint of the step and the interrupted row are written, then submitit requeues the job
    (``scontrol requeue JOB``, the resubmission dumped by RunJob.checkpoint); the requeued job resumes and ends
    exactly as the run that was never stopped."""
    import submitit

    from experiments.job import RunJob

    cfg = load_config(write_config(tmp_path, "stopped"))
    folder = tmp_path / "submitit"
    folder.mkdir()
    submission = submitit.helpers.DelayedSubmission(RunJob(cfg.to_dict(), force=True, run_id=run_id_of(cfg)))
    submission.set_timeout(60, 3)  # what the slurm executor sets: 60 minutes, 3 requeues after timeouts
    pickled = folder / f"{JOB_ID}_submitted.pkl"
    submission.dump(pickled)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": JOB_ID,
           "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
           "SLURM_JOB_NUM_NODES": "1"}
    command = [sys.executable, "-m", "submitit.core._submit", str(folder)]

    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    stage, before = signal_mid_stage_1(process, tmp_path / "stopped", signal.SIGUSR2)
    stderr = process.stderr.read()
    assert process.returncode == 255, stderr[-3000:]  # submitit's exit after a requeue (sys.exit(-1))
    run_dir = run_dir_for(cfg)
    step = assert_stopped_at_one_step(stage, run_dir, before)
    assert calls.read_text().split() == ["requeue", JOB_ID]
    assert "Traceback" not in stderr.split("Caught signal")[0]
    resubmitted = pickle.loads(pickled.read_bytes()).function  # what RunJob.checkpoint returned
    assert isinstance(resubmitted, RunJob) and resubmitted.force is False and resubmitted.run_id == run_id_of(cfg)

    again = subprocess.run(command, cwd=ROOT, env={**env, "SLURM_RESTART_COUNT": "1"}, capture_output=True,
                           text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"(step {step} of 24)" in again.stderr
    assert calls.read_text().split() == ["requeue", JOB_ID]  # not requeued again
    assert_same(outcome(run_dir), straight)


@pytest.mark.slow
def test_sigterm_to_the_command_and_its_loader_workers_checkpoints_and_the_same_command_resumes_exactly(
    tmp_path, straight
):
    """SIGTERM to every process of the command (its two data loader workers too, as ``scancel`` does)."""
    command = [sys.executable, "-m", "experiments", "run", str(write_config(tmp_path, "stopped", workers=2))]
    process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    stage, before = signal_mid_stage_1(process, tmp_path / "stopped", signal.SIGTERM, group=True)
    stderr = process.stderr.read()
    assert process.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr
    (run_dir,) = (tmp_path / "stopped").glob("preempt-*")
    step = assert_stopped_at_one_step(stage, run_dir, before)
    assert f"stopped by signal SIGTERM after step {step} (checkpoint written)" in stderr

    again = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"(step {step} of 24)" in again.stderr
    assert_same(outcome(run_dir), straight)


# -- in this process: the signal sent by the run to itself at a chosen step ----------------------------------------
@pytest.fixture
def usr2_ignored():
    """SIGUSR2 would end pytest if nothing handled it (the code before stop handling): ignored outside the run."""
    previous = signal.signal(signal.SIGUSR2, lambda *args: None)
    yield
    signal.signal(signal.SIGUSR2, previous)


def signal_at(monkeypatch, step: int, *signums: int) -> None:
    """The run receives ``signums`` while it trains step ``step`` (0-based: before the step's forward)."""
    original = Trainer.train_step

    def train_step(self, batch, at):
        if at == step:
            for signum in signums:
                os.kill(os.getpid(), signum)
        return original(self, batch, at)

    monkeypatch.setattr(Trainer, "train_step", train_step)


@pytest.mark.slow
def test_sigusr2_mid_step_stops_after_it_with_a_checkpoint_and_exit_140(tmp_path, monkeypatch, usr2_ignored, capsys):
    from experiments.cli import main

    straight = config(tmp_path, "manual", out="straight", train={**config_train(), "checkpoint_every": 0})
    assert run_experiment(straight)["status"] == "completed"
    cfg = config(tmp_path, "manual", train={**config_train(), "checkpoint_every": 0})
    path = tmp_path / "stopped.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    with monkeypatch.context() as patch:
        signal_at(patch, 3, signal.SIGUSR2, signal.SIGUSR2)  # a second USR2 changes nothing
        assert main(["run", str(path)]) == 140
    err = capsys.readouterr().err
    assert "stopped by signal SIGUSR2 after step 4 (checkpoint written)" in err
    run_dir = run_dir_for(cfg)
    assert latest_checkpoint(run_dir).step == 4  # the step in progress was finished, not lost
    row = json.loads((run_dir / "result.json").read_text())
    assert row["status"] == "interrupted" and row["step"] == 4
    assert main(["run", str(path)]) == 0
    assert "(step 4 of 7)" in capsys.readouterr().err
    assert_same(outcome(run_dir), outcome(run_dir_for(straight)))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the run's handlers are gone


def config_train() -> dict:
    from tests.test_resume import TRAIN

    return dict(TRAIN)


def test_a_second_sigterm_while_stopping_interrupts_at_once(tmp_path, monkeypatch):
    cfg = config(tmp_path, "manual")
    with monkeypatch.context() as patch:
        signal_at(patch, 3, signal.SIGTERM, signal.SIGTERM)
        with pytest.raises(RunInterrupted) as raised:
            run_experiment(cfg)
    assert not isinstance(raised.value, StoppedAtStep) and raised.value.exit_code == 143
    assert "second signal" in str(raised.value)
    row = json.loads((run_dir_for(cfg) / "result.json").read_text())
    assert row["status"] == "interrupted" and "step" not in row
    assert latest_checkpoint(run_dir_for(cfg)).step == 2  # the periodic one: step 3 was not finished


@pytest.mark.slow
def test_a_signal_during_evaluation_stops_at_once_and_the_trained_model_is_kept(tmp_path, monkeypatch, capsys):
    import compress.evaluation.run_eval as run_eval

    straight = config(tmp_path, "manual", out="straight")
    assert run_experiment(straight)["status"] == "completed"
    cfg = config(tmp_path, "manual")
    original = run_eval.evaluate_prepared

    def evaluate(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(run_eval, "evaluate_prepared", evaluate)
        with pytest.raises(StoppedAtStep) as raised:
            run_experiment(cfg)
    assert raised.value.step is None and "outside training" in str(raised.value)
    run_dir = run_dir_for(cfg)
    assert json.loads((run_dir / "result.json").read_text())["status"] == "interrupted"
    assert latest_checkpoint(run_dir).step == 7  # training's last step: nothing trained is lost
    capsys.readouterr()
    assert run_experiment(cfg)["status"] == "completed"
    assert "(step 7 of 7)" in capsys.readouterr().err  # export and evaluation again, no step trained twice
    assert_same(outcome(run_dir), outcome(run_dir_for(straight)))


# -- two processes: only one of them gets the signal -----------------------------------------------------------------
def two_rank_config(out: Path):
    """test_ddp's affinity case without periodic checkpoints: the stop's is the only one before the end."""
    from tests.test_ddp import BASE

    return config_from_dict({**BASE, "train": {**BASE["train"], "checkpoint_every": 0},
                             "output": {**BASE["output"], "dir": str(out)}})


def two_rank_worker(rank: int, out: str, ports: list[int]) -> None:
    from tests.test_ddp import WORLD

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                       "MASTER_ADDR": "127.0.0.1", "HF_HUB_OFFLINE": "1"})
    torch.set_num_threads(1)
    signal.signal(signal.SIGUSR2, lambda *args: None)  # outside the run (the code before stop handling)
    port = iter(ports)
    os.environ["MASTER_PORT"] = str(next(port))
    row = run_experiment(two_rank_config(Path(out) / "straight"))
    assert row["status"] == "completed", row.get("error")
    original = Trainer.train_step

    def train_step(self, batch, at):  # rank 1 alone receives the signal, in the middle of step 1
        if at == 1 and rank == 1:
            os.kill(os.getpid(), signal.SIGUSR2)
        return original(self, batch, at)

    cfg = two_rank_config(Path(out) / "stopped")
    os.environ["MASTER_PORT"] = str(next(port))
    Trainer.train_step = train_step
    try:
        run_experiment(cfg)
        stopped = {"stopped": False}
    except StoppedAtStep as stop:
        stopped = {"stopped": True, "step": stop.step, "signal": stop.signum}
    finally:
        Trainer.train_step = original
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(stopped))
    os.environ["MASTER_PORT"] = str(next(port))
    if rank == 0:  # what the stop left, before the restart
        checkpoints = sorted(p.name for p in (run_dir_for(cfg) / "checkpoints").iterdir())
        (Path(out) / "checkpoints.json").write_text(json.dumps(checkpoints))
    row = run_experiment(cfg)
    assert row["status"] == "completed", row.get("error")


@pytest.mark.slow
def test_two_processes_stop_at_the_same_step_when_only_one_gets_the_signal(tmp_path):
    from tests.test_ddp import WORLD, free_ports

    spawn_and_join(two_rank_worker, (str(tmp_path), free_ports(3)), WORLD, 600)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert ranks == [{"stopped": True, "step": 2, "signal": int(signal.SIGUSR2)}] * WORLD
    assert json.loads((tmp_path / "checkpoints.json").read_text()) == ["latest", "step-00000002"]  # one, rank 0's
    stopped = two_rank_config(tmp_path / "stopped")
    row = json.loads((run_dir_for(stopped) / "result.json").read_text())
    assert row["status"] == "completed"
    assert_same(outcome(run_dir_for(stopped)), outcome(run_dir_for(two_rank_config(tmp_path / "straight"))))


# -- two processes, the agreement alone: which step every rank stops at ----------------------------------------------
AGREE_STEPS = 4


def agreement_worker(rank: int, out: str, port: int, nccl_like: bool, signal_at: int | str) -> None:
    """A training loop reduced to its agreement (``Trainer.fit``: ``agreed(is_last)`` after every step, inside
    ``deferred()``) over gloo; rank 1 alone sends itself SIGUSR2 before step ``signal_at``'s agreement, or just
    after the last one (``"end"``). ``nccl_like``: the run looks like an NCCL run to the stop flag (its reduction
    is the asynchronous one read a call later, here on the CPU) and no side group may be made. Afterwards both
    ranks meet in a collective, as run.py's ``data_stats.as_metrics(all_ranks=True)``, unless they stopped."""
    import datetime

    import torch.distributed as dist

    from compress import stopping

    torch.set_num_threads(1)
    if nccl_like:
        dist.get_backend = lambda *args, **kwargs: "nccl"
        stopping._flag_device = lambda: torch.device("cpu")

    def no_side_group(*args, **kwargs):
        raise RuntimeError("a side group was made (gloo across nodes)")

    dist.new_group = no_side_group
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=20))
    result: dict = {}
    try:
        with stopping.stop_signals():
            try:
                with stopping.deferred():
                    for step in range(AGREE_STEPS):
                        is_last = step + 1 == AGREE_STEPS
                        if rank == 1 and step == signal_at:
                            os.kill(os.getpid(), signal.SIGUSR2)
                        stop = stopping.agreed(is_last)
                        if rank == 1 and is_last and signal_at == "end":
                            os.kill(os.getpid(), signal.SIGUSR2)  # after the last step's agreement
                        if stop:
                            raise StoppedAtStep(stop, step + 1)
                result["stopped"] = None
                flag = torch.ones(1)
                dist.all_reduce(flag)  # the collective after training
                result["after"] = float(flag)
            except StoppedAtStep as stop:
                result["stopped"] = stop.step if stop.step is not None else "end"
    except Exception as error:  # noqa: BLE001 - reported to the test
        result["error"] = repr(error)
    (Path(out) / f"agree{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("nccl_like", "signal_at", "stopped"),
    [
        (False, 1, 2),  # gloo: read at once, after the step of the signal
        (True, 1, 3),  # NCCL: read at the next step's end, one step later, on both ranks
        (True, AGREE_STEPS - 1, AGREE_STEPS),  # the last step reads its flag at once
        (False, "end", "end"),  # after the last agreement: training's end agrees once more
        (True, "end", "end"),
    ],
)
def test_ranks_stop_together_at_the_same_step(tmp_path, nccl_like, signal_at, stopped):
    from tests.test_ddp import WORLD, free_ports

    (port,) = free_ports(1)
    spawn_and_join(agreement_worker, (str(tmp_path), port, nccl_like, signal_at), WORLD, 120)
    ranks = [json.loads((tmp_path / f"agree{r}.json").read_text()) for r in range(WORLD)]
    assert ranks == [{"stopped": stopped}] * WORLD
