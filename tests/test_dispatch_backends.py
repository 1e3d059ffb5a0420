"""The backends end to end on a small sweep (inline, debug, local), resubmission, retrying failed
runs, and the SLURM backend against a fake ``sbatch`` (the submitted scripts and pickled jobs)."""

from __future__ import annotations

import json
import os
import pickle
import stat
import time
from pathlib import Path

import pytest

from compress.config import ConfigError
from compress.recipe import run_id_of
from compress.results import read_result
from experiments.cli import main
from experiments.job import RunJob, RunQueue
from experiments.status import MANIFEST_FILE
from experiments.sweep import load_sweep
from tests.test_run_e2e import tiny_config
from tests.test_sweep import write_sweep

ROOT = Path(__file__).resolve().parents[1]


def manifest(tmp_path: Path, name: str = "abl") -> list[dict]:
    path = tmp_path / "runs" / name / MANIFEST_FILE
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def statuses(runs) -> list[str | None]:
    return [(read_result(r.run_dir) or {}).get("status") for r in runs]


def test_inline_sweep_runs_everything_and_resubmission_runs_nothing(tmp_path, capsys):
    path = write_sweep(tmp_path, axes={"train.lr": [1.0e-3, 3.0e-4]}, seeds=[0, 1])
    runs = load_sweep(path).runs()
    assert main(["sweep", str(path), "--backend", "inline"]) == 0
    assert statuses(runs) == ["completed"] * 4
    rows = [read_result(r.run_dir) for r in runs]
    assert [(row["run_id"], row["config"]["seed"]) for row in rows] == [(r.run_id, r.cfg.seed) for r in runs]
    stamps = [(r.run_dir / "result.json").stat().st_mtime_ns for r in runs]
    capsys.readouterr()
    assert main(["sweep", str(path), "--backend", "inline"]) == 0
    assert "nothing to submit: 4 runs skipped" in capsys.readouterr().out
    assert [(r.run_dir / "result.json").stat().st_mtime_ns for r in runs] == stamps  # nothing ran again
    assert len(manifest(tmp_path)) == 4  # nothing submitted again


def test_a_run_failing_during_training_leaves_a_failed_row_and_only_failed_retries_it(tmp_path, capsys):
    # a training set whose file is not on this machine passes validation (data sets live on the cluster) and
    # fails when the run builds its data
    missing = str(tmp_path / "not-here.csv")
    path = write_sweep(tmp_path, axes={"data.train": [{"kind": "synthetic", "num_samples": 16},
                                                      {"kind": "csv", "path": missing}]}, seeds=[0, 1])
    runs = load_sweep(path).runs()
    assert main(["sweep", str(path), "--backend", "inline"]) == 1  # a run failed
    assert statuses(runs) == ["completed", "completed", "failed", "failed"]
    assert "not-here.csv" in read_result(runs[2].run_dir)["error"]
    assert "2 completed, 2 failed" in capsys.readouterr().out
    done = [(r.run_dir / "result.json").stat().st_mtime_ns for r in runs[:2]]
    assert main(["sweep", str(path), "--backend", "inline", "--only-failed"]) == 1
    assert [e["run_id"] for e in manifest(tmp_path)[4:]] == [runs[2].run_id, runs[3].run_id]
    assert [(r.run_dir / "result.json").stat().st_mtime_ns for r in runs[:2]] == done
    assert statuses(runs) == ["completed", "completed", "failed", "failed"]


def test_force_reruns_completed_runs_from_step_0(tmp_path):
    path = write_sweep(tmp_path, seeds=[0])
    (run,) = load_sweep(path).runs()
    assert main(["sweep", str(path), "--backend", "inline"]) == 0
    first = read_result(run.run_dir)["started_at"], (run.run_dir / "result.json").stat().st_mtime_ns
    assert main(["sweep", str(path), "--backend", "inline", "--force"]) == 0
    assert (run.run_dir / "result.json").stat().st_mtime_ns != first[1] and len(manifest(tmp_path)) == 2


@pytest.mark.slow
def test_debug_backend_runs_the_sweep_through_submitit_and_never_opens_pdb(tmp_path, monkeypatch):
    import pdb

    monkeypatch.setattr(pdb, "post_mortem", lambda *a, **k: pytest.fail("the debug executor opened pdb"))
    path = write_sweep(tmp_path, axes={"train.lr": [1.0e-3, 3.0e-4]}, seeds=[0, 1])
    runs = load_sweep(path).runs()
    # run 0's job raises (as a job whose directory another process holds would): the others still run
    import compress.run

    original = compress.run.run_experiment

    def raising(cfg, force=False):
        if run_id_of(cfg) == runs[0].run_id:
            raise RuntimeError("this job cannot run")
        return original(cfg, force=force)

    with monkeypatch.context() as patched:
        patched.setattr(compress.run, "run_experiment", raising)
        assert main(["sweep", str(path), "--backend", "debug"]) == 1
    assert statuses(runs) == [None, "completed", "completed", "completed"]
    entries = manifest(tmp_path)
    assert all(e["job_id"].startswith("DEBUG_") and e["backend"] == "debug" for e in entries) and len(entries) == 4
    assert main(["sweep", str(path), "--backend", "debug"]) == 0
    assert statuses(runs) == ["completed"] * 4


@pytest.mark.slow
def test_local_backend_returns_at_once_and_runs_at_most_max_parallel_jobs(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the jobs import this checkout
    path = write_sweep(tmp_path, axes={"train.lr": [1.0e-3, 3.0e-4]}, seeds=[0, 1],
                       set={"dispatch.max_parallel": 2})
    runs = load_sweep(path).runs()
    assert main(["sweep", str(path), "--backend", "local"]) == 0
    # returned at once: the jobs need seconds to start, so not every run has its result yet (a sweep waiting
    # for its jobs would have them all)
    assert None in statuses(runs)
    entries = manifest(tmp_path)
    assert [e["run_id"] for e in entries] == [r.run_id for r in runs]
    jobs = [e["job_id"] for e in entries]
    assert jobs[0] == jobs[2] and jobs[1] == jobs[3] and jobs[0] != jobs[1]  # 2 jobs, runs round robin
    deadline = time.time() + 240
    while any(s is None for s in statuses(runs)) and time.time() < deadline:
        time.sleep(0.5)
    assert statuses(runs) == ["completed"] * 4, [p.read_text()[-2000:] for p in (tmp_path / "runs").rglob("*.err")]
    assert main(["sweep", str(path), "--backend", "local"]) == 0
    assert len(manifest(tmp_path)) == 4  # all completed: nothing submitted


@pytest.fixture
def local_executors(monkeypatch) -> list:
    """submitit's LocalExecutor replaced by a stand-in that records its parameters and the submitted
    function (no process starts); returns the list of executors made."""
    import submitit

    made = []

    class Recorder:
        def __init__(self, folder, max_num_timeout):
            self.folder, self.max_num_timeout, self.params = folder, max_num_timeout, {}
            made.append(self)

        def update_parameters(self, **params):
            self.params.update(params)

        def submit(self, fn):
            self.fn = fn
            return type("Job", (), {"job_id": str(len(made))})()

    monkeypatch.setattr(submitit, "LocalExecutor", Recorder)
    return made


@pytest.mark.parametrize("devices", [0, 8])
def test_local_executor_gets_the_dispatch_settings(tmp_path, monkeypatch, local_executors, devices):
    """timeout_min, signal_delay_s, max_num_timeout, tasks (one per GPU) and max_parallel reach
    submitit's LocalExecutor; with enough GPUs the parallel jobs get disjoint ones, without any the
    tasks run on the CPU."""
    import experiments.backends.local
    from experiments.dispatch import submit

    monkeypatch.setattr(experiments.backends.local, "cuda_devices", lambda: devices)
    made = local_executors
    cfgs = [tiny_config(tmp_path, seed=s, dispatch={"max_parallel": 2, "timeout_min": 7, "signal_delay_s": 30,
                                                    "max_num_timeout": 5, "gpus_per_node": 3}) for s in range(3)]
    subs = submit(cfgs, "local", tmp_path / "logs")
    assert [s.job_id for s in subs] == ["1", "2", "1"]
    assert len(made) == 2 and all(e.max_num_timeout == 5 for e in made)
    assert made[0].params["timeout_min"] == 14 and made[1].params["timeout_min"] == 7  # per run: 2 runs, 1 run
    assert made[0].params["signal_delay_s"] == 30
    assert made[0].params["tasks_per_node"] == 3 and made[0].params["gpus_per_node"] == (3 if devices else 0)
    assert [e.params.get("visible_gpus") for e in made] == ([[0, 1, 2], [3, 4, 5]] if devices else [None, None])
    assert isinstance(made[0].fn, RunQueue) and [j.config["seed"] for j in made[0].fn.jobs] == [0, 2]
    assert isinstance(made[1].fn, RunJob) and made[1].fn.config["seed"] == 1


def test_parallel_local_jobs_never_share_gpus(tmp_path, monkeypatch, local_executors):
    """Every local job running at once (over all groups of dispatch settings) gets its own GPUs; fewer GPUs
    than max_parallel x gpus_per_node is a one-line refusal before any job starts."""
    import experiments.backends.local
    from experiments.dispatch import DispatchError, submit

    def cfgs(max_parallel: int) -> list:
        dispatch = {"max_parallel": max_parallel, "gpus_per_node": 2}
        return [tiny_config(tmp_path, seed=s, dispatch={**dispatch, "timeout_min": 60 + s // 3}) for s in range(4)]

    monkeypatch.setattr(experiments.backends.local, "cuda_devices", lambda: 6)
    submit(cfgs(2), "local", tmp_path / "logs")  # seeds 0-2: 2 jobs; seed 3 (another timeout): 1 job
    assert [e.params["visible_gpus"] for e in local_executors] == [[0, 1], [2, 3], [4, 5]]
    local_executors.clear()
    monkeypatch.setattr(experiments.backends.local, "cuda_devices", lambda: 4)
    with pytest.raises(DispatchError, match=r"need 6 GPUs \(2 parallel job\(s\) x 2 GPUs \+ 1 parallel.* has 4"):
        submit(cfgs(2), "local", tmp_path / "logs")
    assert local_executors == []
    with pytest.raises(DispatchError, match=r"need 6 GPUs \(3 parallel job\(s\) x 2 GPUs\)"):
        submit(cfgs(4)[:3], "local", tmp_path / "logs")  # max_parallel 4, 3 runs: 3 jobs at once
    assert local_executors == []
    submit(cfgs(2)[:3], "local", tmp_path / "logs")  # 2 jobs of 2 GPUs fit in 4
    assert [e.params["visible_gpus"] for e in local_executors] == [[0, 1], [2, 3]]


FAKE_SBATCH = """#!/bin/sh
# records its arguments and the submitted script, prints a job id (1001, 1002, ...)
n=$(cat "{log}/count" 2>/dev/null || echo 1000); n=$((n + 1)); echo $n > "{log}/count"
echo "$@" >> "{log}/args"
cp "$1" "{log}/script-$n.sh"
echo "Submitted batch job $n"
"""


#: ``squeue`` and ``sinfo`` print the file ``LOG/<tool>`` (what the test says the cluster has), or fail as
#: where the controller cannot be reached; every call is logged in ``LOG/<tool>-calls``
FAKE_QUERY = """#!/bin/sh
echo "$@" >> "{log}/{tool}-calls"
if [ -f "{log}/{tool}" ]; then cat "{log}/{tool}"; exit 0; fi
echo "{tool}: error: Unable to contact slurm controller (connect failure)" >&2
exit 1
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """``sbatch``, ``srun``, ``squeue`` and ``sinfo`` on PATH, as submitit's own tests fake a cluster (squeue
    and sinfo fail until the test writes their answer: see :data:`FAKE_QUERY`); returns the log folder."""
    bin_dir, log = tmp_path / "bin", tmp_path / "sbatch-log"
    bin_dir.mkdir()
    log.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH.format(log=log))
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for tool in ("squeue", "sinfo"):
        (bin_dir / tool).write_text(FAKE_QUERY.format(log=log, tool=tool))
    for tool in ("sbatch", "srun", "squeue", "sinfo"):
        (bin_dir / tool).chmod((bin_dir / tool).stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def sbatch_flags(script: str) -> dict[str, str]:
    flags = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            flags[key] = value
    return flags


def test_slurm_backend_submits_job_arrays_in_chunks_with_the_resources(tmp_path, fake_slurm, capsys):
    dispatch = {"dispatch.partition": "gpu", "dispatch.account": "proj", "dispatch.nodes": 2,
                "dispatch.gpus_per_node": 4, "dispatch.cpus_per_task": 8,
                "dispatch.timeout_min": 90, "dispatch.signal_delay_s": 150, "dispatch.array_parallelism": 2,
                "dispatch.max_array_size": 3, "dispatch.max_num_timeout": 5,
                "dispatch.slurm_options": {"constraint": "a100", "qos": "high"}}
    # 8 runs; the two learning rates ask for different memory: two groups, each cut into arrays of <= 3
    path = write_sweep(tmp_path, zip=[{"train.lr": [1.0e-3, 3.0e-4], "dispatch.mem_gb": [64, 128]}],
                       seeds=[0, 1, 2, 3], set=dispatch)
    runs = load_sweep(path).runs()
    assert main(["sweep", str(path), "--backend", "slurm"]) == 0
    scripts = [(fake_slurm / f"script-{n}.sh").read_text() for n in range(1001, 1005)]
    assert not (fake_slurm / "script-1005.sh").exists()
    flags = [sbatch_flags(s) for s in scripts]
    assert [f.get("array") for f in flags] == ["0-2%2", None, "0-2%2", None]  # an array of one is a plain job
    assert [f["mem"] for f in flags] == ["64GB", "64GB", "128GB", "128GB"]
    for f in flags:
        assert f["partition"] == "gpu" and f["account"] == "proj" and f["nodes"] == "2"
        assert f["gpus-per-node"] == "4" and f["ntasks-per-node"] == "4" and f["cpus-per-task"] == "8"
        assert f["time"] == "90" and f["signal"] == "USR2@150" and f["job-name"] == "abl"
        assert f["constraint"] == "a100" and f["qos"] == "high" and f["requeue"] == ""  # `#SBATCH --requeue`
    folder = tmp_path / "runs" / "abl" / "submitit"
    for script in scripts:
        assert "srun --unbuffered" in script and f"-m submitit.core._submit {folder}" in script
        assert "--kill-on-bad-exit=1" in script  # 8 tasks of one run: a failing task ends the step
    entries = manifest(tmp_path)
    assert [e["run_id"] for e in entries] == [r.run_id for r in runs]
    by_run = {e["run_id"]: e["job_id"] for e in entries}
    lr_high = [r for r in runs if r.cfg.train.lr == 1e-3]
    assert [by_run[r.run_id] for r in lr_high] == ["1001_0", "1001_1", "1001_2", "1002"]
    # the pickled job of each run: a RunJob of its plain config, requeued at most max_num_timeout times
    from submitit.core.utils import DelayedSubmission

    for run in runs:
        (pickled,) = folder.glob(f"{by_run[run.run_id]}_submitted.pkl")
        submission = DelayedSubmission.load(pickled)
        job = submission.function
        assert isinstance(job, RunJob) and job.config == run.cfg.to_dict() and job.force is False
        assert job.run_id == run.run_id and submission._timeout_countdown == 5
        assert run_id_of(pickle.loads(pickle.dumps(job)).run_config()) == run.run_id
    out = capsys.readouterr().out
    assert "8 submitted, 0 skipped" in out and "1001_0" in out


def test_slurm_off_cluster_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    path = write_sweep(tmp_path, seeds=[0])
    assert main(["sweep", str(path), "--backend", "slurm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sbatch not found" in err[0]
    assert not (tmp_path / "runs" / "abl" / MANIFEST_FILE).exists()


def test_dispatch_settings_are_checked_and_inprocess_is_renamed(tmp_path):
    with pytest.raises(ConfigError, match="'inprocess' was renamed: use 'inline'"):
        tiny_config(tmp_path, dispatch={"backend": "inprocess"})
    for bad, message in [({"max_parallel": 0}, "dispatch.max_parallel: must be at least 1"),
                         ({"max_array_size": 0}, "dispatch.max_array_size"),
                         ({"mem_gb": -1}, "dispatch.mem_gb"),
                         ({"timeout_min": 1, "signal_delay_s": 60}, "dispatch.signal_delay_s"),
                         ({"slurm_options": {"partition": "x"}}, "dispatch.slurm_options.partition: set by the"),
                         ({"backend": "slurmm"}, "Did you mean 'slurm'")]:
        with pytest.raises(ConfigError, match=message):
            tiny_config(tmp_path, dispatch=bad)
    assert tiny_config(tmp_path, dispatch={"nodes": 4, "gpus_per_node": 8}).dispatch.nodes == 4  # data-parallel


def test_run_job_takes_a_plain_config_and_refuses_a_changed_run_id(tmp_path):
    cfg = tiny_config(tmp_path)
    with pytest.raises(TypeError, match="plain config dict"):
        RunJob(cfg)
    job = RunJob(cfg.to_dict(), run_id="0" * 12)
    with pytest.raises(RuntimeError, match="submitted as run 000000000000"):
        job()
    assert not (tmp_path / "runs").exists()


def test_a_requeued_queue_resumes_its_current_run_and_keeps_force_for_the_rest(tmp_path):
    jobs = [RunJob(tiny_config(tmp_path, seed=s).to_dict(), force=True) for s in range(3)]
    queue = RunQueue(jobs)
    queue.current = 1  # preempted during the second run
    requeued = queue.checkpoint().function
    assert isinstance(requeued, RunQueue)
    assert [(j.config["seed"], j.force) for j in requeued.jobs] == [(1, False), (2, True)]


def test_a_refused_sbatch_is_one_line_and_records_nothing(tmp_path, fake_slurm, capsys):
    (tmp_path / "bin" / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: Invalid account or account/partition'"
                                             " >&2\nexit 1\n")
    path = write_sweep(tmp_path, seeds=[0, 1])
    assert main(["sweep", str(path), "--backend", "slurm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # sbatch's own stderr passes through, then ours
    assert err[-1].startswith("clip-compress: error: slurm submission failed") and "Invalid account" in err[-1]
    assert manifest(tmp_path) == []


def test_run_with_the_slurm_backend_submits_and_returns(tmp_path, fake_slurm, capsys):
    from tests.test_sweep import BASE

    path = tmp_path / "one.yaml"
    path.write_text(json.dumps({**BASE, "output": {"dir": str(tmp_path / "runs")}}))
    assert main(["run", str(path), "--backend", "slurm"]) == 0
    out = capsys.readouterr().out
    assert "as job 1001" in out and "result.json" in out
    script = (fake_slurm / "script-1001.sh").read_text()
    assert "--array" not in script and "#SBATCH --job-name=base" in script


@pytest.mark.slow
def test_a_local_job_of_two_tasks_trains_data_parallel_like_one_process(tmp_path, capsys):
    """dispatch.gpus_per_node: 2 on a machine without GPUs: one local job of two CPU tasks; the job
    exports torchrun's variables and the run trains data-parallel (gloo) over both."""
    cfg = ROOT / "experiments/configs/tiny-test.yaml"
    common = [f"--set=output.dir={tmp_path / 'one'}", "--set=train.progress=false", "--set=eval.throughput=false"]
    assert main(["run", str(cfg), "--backend", "inline", *common]) == 0
    two = [*common[1:], f"--set=output.dir={tmp_path / 'two'}", "--set=dispatch.gpus_per_node=2"]
    assert main(["run", str(cfg), "--backend", "local", *two]) == 0
    (one_dir,), (two_dir,) = (list((tmp_path / k).glob("tiny-test-*")) for k in ("one", "two"))
    one_row, two_row = read_result(one_dir), read_result(two_dir)
    assert two_row["status"] == "completed" and two_row["metrics"]["dist/world_size"] == 2
    assert one_row["metrics"]["dist/world_size"] == 1
    losses = [[json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (one_dir, two_dir)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-5)


def test_inline_refuses_a_config_asking_for_several_gpus(tmp_path, capsys):
    code = main(["run", str(ROOT / "experiments/configs/tiny-test.yaml"), "--backend", "inline",
                 f"--set=output.dir={tmp_path}", "--set=dispatch.gpus_per_node=4"])
    assert code == 2
    assert "runs in this one process: use --backend local or slurm" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_running_run_is_not_submitted_again(tmp_path, capsys):
    """A run whose directory a live process holds is shown as running and skipped (its lock would refuse it)."""
    from compress.rundir import owned_run_dir

    path = write_sweep(tmp_path, axes={"train.lr": [1.0e-3, 3.0e-4]}, seeds=[0])
    runs = load_sweep(path).runs()
    with owned_run_dir(runs[0].run_dir, runs[0].run_id):
        assert main(["sweep", str(path), "--backend", "inline", "--force"]) == 0
    table = capsys.readouterr().out
    assert f"{runs[0].run_id}  running      skip" in table
    assert statuses(runs) == [None, "completed"]


def test_force_is_one_shot_a_job_restarted_by_slurm_resumes(tmp_path, monkeypatch):
    """SLURM restarting a job itself (node failure, PreemptMode=REQUEUE) reloads the pickle submitted with
    force: with SLURM_RESTART_COUNT > 0 the run resumes (no start_fresh) and a completed one is not rerun."""
    import compress.run

    cleared = []
    original = compress.run.start_fresh
    monkeypatch.setattr(compress.run, "start_fresh", lambda run_dir: (cleared.append(run_dir), original(run_dir)))
    cfg = tiny_config(tmp_path)
    job = pickle.loads(pickle.dumps(RunJob(cfg.to_dict(), force=True, run_id=run_id_of(cfg))))
    result = compress.run.run_dir_for(cfg) / "result.json"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert job()["status"] == "completed" and cleared == []
    stamp = result.stat().st_mtime_ns
    assert job()["status"] == "completed" and result.stat().st_mtime_ns == stamp and cleared == []
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # the job as submitted: force holds
    assert job()["status"] == "completed" and cleared == [compress.run.run_dir_for(cfg)]
    assert result.stat().st_mtime_ns != stamp


@pytest.mark.parametrize("command", [["sweep", "{sweep}"], ["sweep", "{sweep}", "--dry-run"],
                                     ["run", "{config}", "--backend", "local"],
                                     ["run", "{config}", "--backend", "debug"],
                                     ["run", "{config}", "--set", "dispatch.backend=slurm"]])
def test_sweeps_and_backends_are_refused_under_torchrun(tmp_path, monkeypatch, capsys, command):
    """Under torchrun every rank would submit the jobs and append the manifest: refused before anything
    (no process group is started)."""
    from tests.test_sweep import BASE

    config = tmp_path / "one.yaml"
    config.write_text(json.dumps({**BASE, "output": {"dir": str(tmp_path / "runs")}}))
    sweep = write_sweep(tmp_path, seeds=[0, 1])
    for key, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29511"}.items():
        monkeypatch.setenv(key, value)
    assert main([part.format(sweep=sweep, config=config) for part in command]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torchrun starts the processes of ONE run" in err[0] and "--backend inline" in err[0]
    assert not (tmp_path / "runs").exists()


def test_a_submitted_run_without_a_directory_is_shown_queued(tmp_path, fake_slurm, capsys):
    """Where SLURM cannot be asked (squeue fails), a run whose newest manifest line has a job id but no run
    directory yet may still wait in SLURM's queue: the sweep's table says queued? and warns (it is submitted
    again: the job may have died)."""
    path = write_sweep(tmp_path, seeds=[0, 1])
    runs = load_sweep(path).runs()
    assert main(["sweep", str(path), "--backend", "slurm"]) == 0
    from compress.rundir import RUN_ID_FILE

    runs[1].run_dir.mkdir(parents=True)
    (runs[1].run_dir / RUN_ID_FILE).write_text(runs[1].run_id)  # run 1 started (and stopped)
    capsys.readouterr()
    assert main(["sweep", str(path), "--backend", "slurm", "--dry-run"]) == 0
    out = capsys.readouterr().out
    lines = [next(x for x in out.splitlines() if run.run_id in x) for run in runs]
    assert lines[0].split()[2:4] == ["queued?", "submit"] and lines[1].split()[2:4] == ["stopped", "resume"]
    assert "note: 1 run(s) queued?: submitted (job 1001_0) but not started" in out
    assert "SLURM cannot be asked here (squeue missing or failing)" in out
    assert main(["sweep", str(path), "--backend", "slurm"]) == 0
    assert [e["job_id"] for e in manifest(tmp_path)] == ["1001_0", "1001_1", "1002_0", "1002_1"]


def test_a_failing_task_other_than_rank_0_exits_non_zero(tmp_path, monkeypatch):
    """srun's --kill-on-bad-exit then ends the step, so no task waits on its failed peer in a collective."""
    import compress.run
    from compress.recipe import config_from_dict

    cfg = tiny_config(tmp_path)
    monkeypatch.setattr(compress.run, "run_experiment", lambda cfg, force=False: {"status": "failed", "error": "x"})
    monkeypatch.setattr("experiments.job.export_task_environment", lambda: None)
    for key, value in {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(RuntimeError, match="rank 1 of 2: x"):
        RunJob(cfg.to_dict())()
    monkeypatch.setenv("RANK", "0")  # rank 0 returns its failed row (it wrote it)
    assert RunJob(config_from_dict(cfg.to_dict()).to_dict())()["status"] == "failed"


#: ``load_config(tiny-test.yaml).to_dict()["dispatch"]`` before backends were types (commit 941f5a6), without and
#: with SLURM settings written: every backend's setting with its default (what config.yaml and rows hold)
DISPATCH_941F5A6 = {"backend": "inline", "nodes": 1, "gpus_per_node": 1, "tasks_per_node": None, "timeout_min": 1440,
                    "max_parallel": 1, "partition": None, "account": None, "cpus_per_task": None, "mem_gb": None,
                    "array_parallelism": 256, "max_array_size": 1000, "signal_delay_s": 120, "max_num_timeout": 3,
                    "slurm_options": {}}
SLURM_SET = ["dispatch.backend=slurm", "dispatch.mem_gb=64", "dispatch.cpus_per_task=8",
             "dispatch.slurm_options={qos: high}"]
SLURM_941F5A6 = {**DISPATCH_941F5A6, "backend": "slurm", "cpus_per_task": 8, "mem_gb": 64.0,
                 "slurm_options": {"qos": "high"}}


@pytest.mark.parametrize(("overrides", "expected"), [([], DISPATCH_941F5A6), (SLURM_SET, SLURM_941F5A6)])
def test_the_resolved_dispatch_section_has_every_backend_default(overrides, expected):
    """The section written to config.yaml, a row and a manifest is the resolved one, as before backends were
    types: rows of runs that wrote different dispatch keys have the same columns; settings read as attributes."""
    from compress.recipe import load_config

    cfg = load_config(ROOT / "experiments" / "configs" / "tiny-test.yaml", overrides)
    dispatch = cfg.to_dict()["dispatch"]
    assert dispatch == expected and type(dispatch["mem_gb"]) is type(expected["mem_gb"])
    assert cfg.dispatch.timeout_min == 1440 and cfg.dispatch.slurm_options == expected["slurm_options"]
    with pytest.raises(AttributeError):
        cfg.dispatch.timeout_minutes  # noqa: B018 - the attribute is what is tested


def test_a_backend_whose_defaults_fail_its_check_breaks_only_itself():
    """A backend's own check runs for the chosen backend and for a backend whose settings were set, not for
    every registered backend on every config."""
    from dataclasses import dataclass

    import experiments.backends as backends
    from compress.recipe import load_config
    from experiments.backends.base import Backend

    @dataclass
    class BrokenSettings:
        broken_queue: str = ""

        def check(self) -> None:
            if not self.broken_queue:
                raise ConfigError("dispatch.broken_queue: must name a queue")

    config = ROOT / "experiments" / "configs" / "tiny-test.yaml"
    with backends.scoped():
        backends.register_backend(type("Broken", (Backend,), {"name": "broken", "Settings": BrokenSettings,
                                                              "submit": lambda *a: []}))
        cfg = load_config(config)
        assert cfg.dispatch.backend == "inline" and cfg.dispatch.broken_queue == ""
        load_config(config, ["dispatch.backend=local", "dispatch.max_parallel=2"])
        with pytest.raises(ConfigError, match="dispatch.broken_queue: must name a queue"):
            load_config(config, ["dispatch.backend=broken"])
        assert load_config(config, ["dispatch.backend=broken", "dispatch.broken_queue=q"]).dispatch.broken_queue == "q"
        with pytest.raises(ConfigError, match="dispatch.max_parallel: must be at least 1"):
            load_config(config, ["dispatch.max_parallel=0"])  # a setting written is checked whatever the backend
