"""The SLURM backend against a real single-node SLURM (``tests/slurm/start_slurm.sh``): a sweep as a job
array with status and collect, a two-task data-parallel job (gloo on the CPU), a requeue from outside
(``scontrol requeuehold``, then ``release``) and a USR2 preemption (``scancel --signal=USR2``: submitit
requeues with ``scontrol requeue``) that resume and complete, and a requeued job waiting in the queue
that ``status`` shows queued and ``sweep`` does not submit again.

Run only where the test cluster is up (``.ci/run`` starts it); skipped otherwise, with the reason.
The jobs run this checkout: submitit starts them with this interpreter, and sbatch exports this
process's environment (``PYTHONPATH`` included) to them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.test_sweep import BASE as SWEEP_BASE

#: the ClusterName of tests/slurm/start_slurm.sh: the tier never submits to any other cluster
TEST_CLUSTER = "cc-test"
START = Path(__file__).with_name("start_slurm.sh")


def _scheduler_problem() -> str | None:
    """Why the tier cannot run here, or ``None``."""
    missing = [tool for tool in ("sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel") if not shutil.which(tool)]
    if missing:
        return (f"SLURM not installed ({', '.join(missing)} not on PATH): apt-get install -y slurm-wlm munge, "
                f"then {START}")
    try:
        config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30)
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as error:
        return f"the SLURM scheduler does not answer ({error}): start it with {START} (as root)"
    if config.returncode != 0 or nodes.returncode != 0:
        return f"the SLURM scheduler is not up ({(config.stderr or nodes.stderr).strip()[:120]}): start it with {START}"
    if not re.search(rf"ClusterName\s*=\s*{TEST_CLUSTER}\b", config.stdout):
        return f"the SLURM here is not the test cluster {TEST_CLUSTER!r} of {START}: the tier submits only there"
    if not re.search(r"^(idle|mixed|allocated|completing)", nodes.stdout, re.M):
        return f"the test cluster's node is not up (sinfo: {nodes.stdout.strip()[:80]}): restart {START}"
    return None


PROBLEM = _scheduler_problem()
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(PROBLEM is not None, reason=f"slurm tier: {PROBLEM}")]

ROOT = Path(__file__).resolve().parents[2]

#: the sweeps' tiny run (tests.test_sweep) on the CPU: two steps, no GPU asked, one CPU per task
BASE: dict[str, Any] = {
    **SWEEP_BASE, "data": {"train": {"kind": "synthetic", "num_samples": 64}},
    "train": {**SWEEP_BASE["train"], "steps": 2, "batch_size": 8, "device": "cpu"},
    "dispatch": {"backend": "slurm", "gpus_per_node": 0, "cpus_per_task": 1, "mem_gb": 2, "timeout_min": 30},
}


@pytest.fixture(autouse=True)
def this_checkout(monkeypatch):
    """The jobs import this checkout (sbatch exports the environment: --export=ALL)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys) -> Callable[..., Done]:
    """``clip-compress ARGS`` in this process (the jobs it submits are processes of their own)."""
    from experiments.cli import main

    def call(*args: str) -> Done:
        capsys.readouterr()
        code = main(list(args))
        out = capsys.readouterr()
        return Done(code, out.out, out.err)

    return call


def write_sweep(tmp_path: Path, name: str, base: dict[str, Any] | None = None, **sweep: Any) -> Path:
    import yaml

    folder = tmp_path / "configs"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}-base.yaml").write_text(yaml.safe_dump(base or BASE))
    data = {"name": name, "base": f"{name}-base.yaml", "output_dir": str(tmp_path / "runs" / name), **sweep}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def manifest(tmp_path: Path, name: str) -> list[dict[str, Any]]:
    path = tmp_path / "runs" / name / "manifest.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def row(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(run_dir) / "result.json").read_text())
    except (OSError, ValueError):
        return None


def logged_step(run_dir: Path) -> int:
    try:
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return -1
    steps = [json.loads(line).get("step", -1) for line in lines if line.strip().endswith("}")]
    return max(steps, default=-1)


def job_field(job_id: str, key: str) -> str | None:
    """A field of ``scontrol show job`` (e.g. ``JobState``, ``Restarts``)."""
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout
    match = re.search(rf"\b{key}=(\S+)", out)
    return match.group(1) if match else None


def wait_for(condition: Callable[[], bool], timeout: float, what: str, folder: Path, every: float = 1.0) -> None:
    """Poll ``condition`` every ``every`` s; on timeout fail with the queue and the tails of the jobs' logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(every)
    queue = subprocess.run(["squeue", "-r"], capture_output=True, text=True).stdout
    logs = "\n".join(f"== {p}\n{p.read_text()[-1500:]}" for p in sorted(folder.rglob("*.err"))[-4:])
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\nsqueue:\n{queue}\n{logs}")


def test_a_sweep_runs_as_a_job_array_with_status_and_collect(tmp_path, cli):
    path = write_sweep(tmp_path, "arr", seeds=[0, 1, 2])
    done = cli("sweep", str(path))
    assert done.returncode == 0, done.stderr
    entries = manifest(tmp_path, "arr")
    jobs = [e["job_id"] for e in entries]
    assert len(jobs) == 3 and len({j.split("_")[0] for j in jobs}) == 1 and all("_" in j for j in jobs)  # one array
    folder = tmp_path / "runs" / "arr"
    script = next(folder.glob("submitit/*_submission.sh")).read_text()
    assert f"{sys.executable} -u -m submitit.core._submit" in script and "--gpus-per-node" not in script
    wait_for(lambda: all((row(e["run_dir"]) or {}).get("status") == "completed" for e in entries), 300,
             "the array's 3 runs to complete", folder)
    for entry in entries:
        assert row(entry["run_dir"])["metrics"]["train/steps"] == 2
    status = cli("status", str(path))
    assert status.returncode == 0 and "3 runs: 3 completed" in status.stdout, status.stdout + status.stderr
    collected = cli("collect", str(folder), "-o", str(tmp_path / "rows.jsonl"))
    assert collected.returncode == 0, collected.stderr
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 3
    again = cli("sweep", str(path))
    assert again.returncode == 0 and "nothing to submit: 3 runs skipped" in again.stdout
    assert len(manifest(tmp_path, "arr")) == 3


def test_a_two_task_job_trains_data_parallel_on_the_cpu(tmp_path, cli):
    """gpus_per_node: 0, tasks_per_node: 2: one job of two tasks (no GPU asked), DDP over gloo."""
    import yaml

    config = tmp_path / "two.yaml"
    base = {**BASE, "output": {"dir": str(tmp_path / "runs")},
            "dispatch": {**BASE["dispatch"], "tasks_per_node": 2}}
    config.write_text(yaml.safe_dump(base))
    done = cli("run", str(config))
    assert done.returncode == 0 and "as slurm job" in done.stdout, done.stdout + done.stderr
    (run_dir,) = (tmp_path / "runs").glob("base-*")
    script = next((run_dir / "submitit").glob("*_submission.sh")).read_text()
    assert "#SBATCH --ntasks-per-node=2" in script and "--gpus-per-node" not in script
    wait_for(lambda: (row(run_dir) or {}).get("status") == "completed", 300, "the two-task run", run_dir)
    metrics = row(run_dir)["metrics"]
    assert metrics["dist/world_size"] == 2 and metrics["train/steps"] == 2


#: steps of a run signalled mid-training: long enough to be still training a second after its first steps
#: on an idle 2-CPU machine, short enough to finish soon after it resumes
LONG_STEPS = 60


def _signalled_mid_training(cli: Callable[..., Done], tmp_path: Path, name: str,
                            command: list[str]) -> tuple[Path, dict[str, Any], Path]:
    """A one-run sweep (a checkpoint every 5 steps) submitted, and ``command JOB_ID`` run once it trains;
    returns the sweep file, its manifest entry and its output folder."""
    base = {**BASE, "train": {**BASE["train"], "steps": LONG_STEPS, "checkpoint_every": 5}}
    path = write_sweep(tmp_path, name, base=base)
    done = cli("sweep", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    (entry,) = manifest(tmp_path, name)
    folder = tmp_path / "runs" / name
    wait_for(lambda: logged_step(entry["run_dir"]) >= 6, 300, "a checkpoint (step 5)", folder, every=0.2)
    subprocess.run([*command, entry["job_id"]], check=True, capture_output=True, timeout=30)
    assert (row(entry["run_dir"]) or {}).get("status") != "completed", "the run ended before it was signalled"
    return path, entry, folder


def _completes_after_a_restart(entry: dict[str, Any], folder: Path) -> None:
    job = entry["job_id"]
    wait_for(lambda: (row(entry["run_dir"]) or {}).get("status") == "completed", 600,
             "the signalled run to resume and complete", folder)
    assert row(entry["run_dir"])["metrics"]["train/steps"] == LONG_STEPS
    assert int(job_field(job, "Restarts") or 0) >= 1  # the same job, requeued


def test_a_requeued_job_is_queued_not_resubmitted_and_resumes_to_completion(tmp_path, cli):
    """scontrol requeuehold (SIGTERM, back to the queue, held there so the checks cannot race its
    restart): while the job waits, status says queued and sweep (also --only-failed) submits nothing;
    released, the job restarts, resumes and completes with all its steps."""
    path, entry, folder = _signalled_mid_training(cli, tmp_path, "rq", ["scontrol", "requeuehold"])
    job = entry["job_id"]
    wait_for(lambda: job_field(job, "JobState") == "PENDING", 120, "the requeued job to be pending", folder)
    status = cli("status", str(path))
    assert "queued (PENDING)" in status.stdout and "1 queued" in status.stdout, status.stdout + status.stderr
    for extra in ([], ["--only-failed"], ["--force"]):
        again = cli("sweep", str(path), *extra)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "queued" in again.stdout and "nothing to submit" in again.stdout, again.stdout
    assert len(manifest(tmp_path, "rq")) == 1  # not submitted again
    subprocess.run(["scontrol", "release", job], check=True, capture_output=True, timeout=30)
    _completes_after_a_restart(entry, folder)


def test_a_usr2_preemption_requeues_and_the_run_resumes_to_completion(tmp_path, cli):
    """scancel --signal=USR2 (what SLURM sends before a preemption or the time limit): the run finishes its
    step, checkpoints it and writes the interrupted row naming that step; then submitit's handler requeues
    the job, which resumes the run from that checkpoint and completes it."""
    _, entry, folder = _signalled_mid_training(cli, tmp_path, "usr2", ["scancel", "--signal=USR2"])
    signalled_at = logged_step(entry["run_dir"])
    # before the requeued job restarts (about 12 s): the step in progress finished, was checkpointed and the
    # interrupted row names it (not the periodic checkpoint every 5 steps: nothing since it is lost)
    wait_for(lambda: (row(entry["run_dir"]) or {}).get("status") == "interrupted", 120,
             "the interrupted row", folder, every=0.1)
    stopped = row(entry["run_dir"])
    assert stopped["step"] >= signalled_at, stopped
    latest = (Path(entry["run_dir"]) / "checkpoints" / "latest").read_text().strip()
    assert latest.endswith(f"{stopped['step']:08d}"), (latest, stopped["step"])
    _completes_after_a_restart(entry, folder)
