"""The SLURM backend's resources and queue against a fake cluster (``sbatch``, ``squeue``, ``sinfo`` on PATH):
tasks per node apart from GPUs per node, GPUs named when a request is refused, the warning signal's margin,
partitions too small, runs whose job is still queued, and two sweeps on one output folder."""

from __future__ import annotations

import contextlib
import json

import pytest

from compress.config import ConfigError
from compress.recipe import run_id_of
from compress.results import read_result
from compress.rundir import owned_run_dir
from experiments.cli import main
from experiments.status import MANIFEST_FILE
from experiments.sweep import load_sweep
from tests.test_dispatch_backends import fake_slurm, manifest, sbatch_flags  # noqa: F401 - a fixture, used by cluster
from tests.test_run_e2e import tiny_config
from tests.test_sweep import write_sweep


@pytest.fixture
def cluster(fake_slurm):  # noqa: F811 - the imported fixture
    """The fake SLURM of tests.test_dispatch_backends (its log folder)."""
    return fake_slurm


def flags_of(log, job: int) -> dict[str, str]:
    return sbatch_flags((log / f"script-{job}.sh").read_text())


def test_cpu_tasks_per_node_without_gpus_and_gpus_only_when_asked(tmp_path, cluster):
    """gpus_per_node: 0 with tasks_per_node: 2 is a two-task job that asks for no GPU; the default asks
    for one GPU and one task; dispatch stays out of the run id."""
    path = write_sweep(tmp_path, axes={"dispatch.tasks_per_node": [2, None]}, set={"dispatch.gpus_per_node": 0})
    with pytest.raises(ConfigError, match="same experiment"):  # tasks_per_node does not change what is computed
        load_sweep(path)
    path = write_sweep(tmp_path, zip=[{"dispatch.gpus_per_node": [0, 1], "dispatch.tasks_per_node": [2, None],
                                       "train.lr": [1e-3, 3e-4]}])
    assert main(["sweep", str(path), "--backend", "slurm"]) == 0
    cpu, gpu = flags_of(cluster, 1001), flags_of(cluster, 1002)
    assert cpu["ntasks-per-node"] == "2" and "gpus-per-node" not in cpu
    assert "--kill-on-bad-exit=1" in (cluster / "script-1001.sh").read_text()
    assert gpu["ntasks-per-node"] == "1" and gpu["gpus-per-node"] == "1"
    base = tiny_config(tmp_path)
    assert run_id_of(tiny_config(tmp_path, dispatch={"gpus_per_node": 0, "tasks_per_node": 4})) == run_id_of(base)
    assert base.dispatch.tasks() == 1 and tiny_config(tmp_path, dispatch={"gpus_per_node": 4}).dispatch.tasks() == 4


def test_tasks_per_node_with_gpus_is_one_per_gpu(tmp_path):
    with pytest.raises(ConfigError, match=r"dispatch.tasks_per_node: 2 tasks for 4 GPUs per node"):
        tiny_config(tmp_path, dispatch={"gpus_per_node": 4, "tasks_per_node": 2})
    with pytest.raises(ConfigError, match="dispatch.tasks_per_node: must be at least 1"):
        tiny_config(tmp_path, dispatch={"gpus_per_node": 0, "tasks_per_node": 0})
    with pytest.raises(ConfigError, match="dispatch.slurm_options.ntasks_per_node: set by the dispatcher "
                                          r"\(dispatch.tasks_per_node\)"):
        tiny_config(tmp_path, dispatch={"slurm_options": {"ntasks_per_node": 2}})


def test_a_refused_gpu_request_names_the_gpus(tmp_path, cluster, capsys):
    (tmp_path / "bin" / "sbatch").write_text(
        "#!/bin/sh\necho 'sbatch: error: Batch job submission failed: Requested node configuration is not "
        "available' >&2\nexit 1\n")
    path = write_sweep(tmp_path, seeds=[0])
    assert main(["sweep", str(path), "--backend", "slurm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("clip-compress: error: slurm submission failed") and "not available" in err
    assert "asks for 1 GPU(s) per node, dispatch.gpus_per_node" in err and "gpus_per_node: 0" in err
    assert manifest(tmp_path) == []


@pytest.mark.parametrize(("timeout_min", "delay", "refused"), [(1, 0, True), (2, 30, True), (2, 0, False),
                                                               (10, 480, False), (10, 481, True)])
def test_the_warning_signal_leaves_a_minute_even_when_slurm_sends_it_60_s_early(
        tmp_path, cluster, capsys, timeout_min, delay, refused):
    path = write_sweep(tmp_path, seeds=[0], set={"dispatch.timeout_min": timeout_min, "dispatch.signal_delay_s": delay})
    assert main(["sweep", str(path), "--backend", "slurm"]) == (2 if refused else 0)
    err = capsys.readouterr().err.strip().splitlines()
    if refused:
        assert len(err) == 1 and "dispatch.signal_delay_s" in err[0] and "dispatch.timeout_min" in err[0]
        assert "up to 60 s before" in err[0] and manifest(tmp_path) == []
    else:
        assert flags_of(cluster, 1001)["signal"] == f"USR2@{delay}"


def test_gres_gpus_of_sinfo():
    from experiments.backends.slurm import gres_gpus

    assert [gres_gpus(g) for g in ["(null)", "gpu:2", "gpu:a100:4(S:0-1),gpu:v100:2", "mps:100,gpu:8"]] == [0, 2, 6, 8]


def test_a_job_no_node_of_the_partition_can_hold_is_refused(tmp_path, cluster, capsys):
    """sinfo's nodes decide: more GPUs, CPUs or memory per node than any node of the partition has (the job
    would pend forever) is a one-line refusal naming what is too much; where sinfo fails nothing is checked."""
    (cluster / "sinfo").write_text("cpu1|2|21694|(null)|debug*\ng1|64|512000|gpu:a100:8(S:0-1)|gpu\n"
                                      "g2|64|512000|gpu:a100:8(S:0-1)|gpu\n")
    cases = [({}, "the default partition has no 1 node(s) with 1 GPUs"),  # debug* has no GPU
             ({"dispatch.gpus_per_node": 0, "dispatch.tasks_per_node": 4}, "4 CPUs (tasks_per_node x cpus_per_task)"),
             ({"dispatch.partition": "gpu", "dispatch.gpus_per_node": 16}, "at most 8 GPUs"),
             ({"dispatch.partition": "gpu", "dispatch.gpus_per_node": 8, "dispatch.nodes": 3}, "(2 fit)"),
             ({"dispatch.partition": "gpu", "dispatch.gpus_per_node": 8, "dispatch.mem_gb": 1000}, "1024000 MB")]
    for settings, message in cases:
        path = write_sweep(tmp_path, seeds=[0], set=settings)
        assert main(["sweep", str(path), "--backend", "slurm"]) == 2, settings
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and "pending forever" in err[0], (settings, err)
    assert manifest(tmp_path) == []
    for settings in [{"dispatch.gpus_per_node": 0, "dispatch.tasks_per_node": 2},
                     {"dispatch.partition": "gpu", "dispatch.gpus_per_node": 8, "dispatch.nodes": 2}]:
        path = write_sweep(tmp_path, seeds=[0], set=settings)
        assert main(["sweep", str(path), "--backend", "slurm"]) == 0, settings
    (cluster / "sinfo").unlink()  # SLURM cannot be asked: submitted unchecked
    path = write_sweep(tmp_path, seeds=[0], set={"dispatch.gpus_per_node": 64})
    assert main(["sweep", str(path), "--backend", "slurm"]) == 0


def _interrupted(run) -> None:
    run.run_dir.mkdir(parents=True, exist_ok=True)
    (run.run_dir / "run_id").write_text(run.run_id)
    (run.run_dir / "result.json").write_text(json.dumps({"run_id": run.run_id, "name": run.cfg.name,
                                                         "status": "interrupted", "error": "SIGTERM"}))


def test_runs_whose_job_is_still_queued_are_shown_queued_and_not_submitted_again(tmp_path, cluster, capsys):
    """A requeued job waiting in the queue leaves its run interrupted (or stopped) on disk: squeue, asked
    once for every job id of the manifest, says it is queued; sweep, --only-failed and --force skip it."""
    path = write_sweep(tmp_path, seeds=[0, 1, 2, 3])
    runs = load_sweep(path).runs()
    (cluster / "squeue").write_text("")  # the first submission: nothing queued
    assert main(["sweep", str(path), "--backend", "slurm"]) == 0
    assert [e["job_id"] for e in manifest(tmp_path)] == ["1001_0", "1001_1", "1001_2", "1001_3"]
    _interrupted(runs[0])  # requeued after a preemption, waiting
    _interrupted(runs[1])  # its job is gone: to retry
    (runs[2].run_dir).mkdir(parents=True)
    (runs[2].run_dir / "run_id").write_text(runs[2].run_id)  # stopped, its job requeued and starting
    (cluster / "squeue").write_text("1001_0|PENDING\n1001_2|RUNNING\n1001_3|PENDING\n1001_1|COMPLETED\n")
    calls = cluster / "squeue-calls"
    assert not calls.exists()  # nothing was submitted before: squeue not asked
    capsys.readouterr()
    for extra in ([], ["--only-failed"], ["--force"]):
        assert main(["sweep", str(path), "--backend", "slurm", *extra]) == 0
        out = capsys.readouterr().out
        states = [next(x for x in out.splitlines() if run.run_id in x).split()[2:4] for run in runs]
        assert states[0] == states[2] == states[3] == ["queued", "skip"], (extra, out)
        assert states[1][0] == "interrupted" and states[1][1] != "skip"
        assert "note: 3 run(s) queued: their SLURM job is in the queue (job 1001_0, 1001_2, 1001_3)" in out
    assert [e["run_id"] for e in manifest(tmp_path)[4:]] == [runs[1].run_id] * 3  # only the one without a job
    # one squeue call per command, for all the job ids (arrays asked once)
    assert calls.read_text().splitlines() == ["-h -r -o %i|%T -j 1001", "-h -r -o %i|%T -j 1001,1002",
                                              "-h -r -o %i|%T -j 1001,1003"]
    calls.unlink()
    assert main(["status", str(tmp_path / "runs" / "abl")]) == 0
    table = capsys.readouterr().out
    assert "queued (PENDING)" in table and "queued (RUNNING)" in table and "3 queued" in table
    assert len(calls.read_text().splitlines()) == 1
    (cluster / "squeue").unlink()  # SLURM cannot be asked: the runs show their state on disk, with a note
    assert main(["status", str(path)]) == 0
    captured = capsys.readouterr()
    assert "queued" not in captured.out and "2 interrupted, 1 stopped" in captured.out
    assert "note: 4 run(s) were handed to SLURM but SLURM cannot be asked here" in captured.err


def test_a_run_another_sweep_holds_is_running_elsewhere_not_failed(tmp_path, monkeypatch, capsys):
    """Two sweeps on one output folder: a run the other one took after this one made its table (its lock
    held by another live process) is reported running elsewhere, gets no manifest line, and the exit code
    stays 0; a run the other one completed meanwhile is skipped."""
    import experiments.sweep_cli

    path = write_sweep(tmp_path, seeds=[0, 1, 2])
    runs = load_sweep(path).runs()
    held = contextlib.ExitStack()
    original = experiments.sweep_cli.code_version

    def other_sweep_starts():  # called after the table, before the first run: the other sweep takes run 0
        held.enter_context(owned_run_dir(runs[0].run_dir, runs[0].run_id))  # a second open file: a second owner
        return original()

    monkeypatch.setattr(experiments.sweep_cli, "code_version", other_sweep_starts)
    with held:
        assert main(["sweep", str(path), "--backend", "inline"]) == 0
    out = capsys.readouterr().out
    assert f"[running elsewhere] {runs[0].run_id}" in out
    assert "2 submitted, 0 skipped; 2 completed, 0 failed, 1 run or completed by another process" in out
    assert [e["run_id"] for e in manifest(tmp_path)] == [runs[1].run_id, runs[2].run_id]
    assert read_result(runs[0].run_dir) is None and read_result(runs[2].run_dir)["status"] == "completed"
    # the other sweep takes run 2 between this one's check and the run's own lock: still no line, not failed
    monkeypatch.setattr(experiments.sweep_cli, "_elsewhere", lambda run, force: None)
    (runs[2].run_dir / "result.json").unlink()  # stopped: to resume
    held = contextlib.ExitStack()

    def other_sweep_takes_run_2():
        held.enter_context(owned_run_dir(runs[2].run_dir, runs[2].run_id))
        return original()

    monkeypatch.setattr(experiments.sweep_cli, "code_version", other_sweep_takes_run_2)
    with held:
        assert main(["sweep", str(path), "--backend", "inline"]) == 0
    out = capsys.readouterr().out
    assert f"[running elsewhere] {runs[2].run_id}" in out and "in use by another process" in out
    assert read_result(runs[0].run_dir)["status"] == "completed"  # run 0 ran here this time: its line
    assert [e["run_id"] for e in manifest(tmp_path)] == [runs[1].run_id, runs[2].run_id, runs[0].run_id]
    monkeypatch.undo()
    # the other sweep completes run 2 after this one's table: skipped, no line, nothing rerun
    from experiments.job import RunJob

    def completes_run_2():
        RunJob(runs[2].cfg.to_dict(), run_id=runs[2].run_id)()
        return original()

    monkeypatch.setattr(experiments.sweep_cli, "code_version", completes_run_2)
    assert main(["sweep", str(path), "--backend", "inline"]) == 0
    out = capsys.readouterr().out
    assert f"[completed elsewhere] {runs[2].run_id}" in out
    assert len(manifest(tmp_path)) == 3
    assert (tmp_path / "runs" / "abl" / MANIFEST_FILE).is_file()


def test_a_local_queue_reports_a_held_run_as_running_elsewhere(tmp_path):
    from experiments.job import RunJob, RunQueue

    cfgs = [tiny_config(tmp_path, seed=s) for s in range(2)]
    from compress.run import run_dir_for

    with owned_run_dir(run_dir_for(cfgs[0]), run_id_of(cfgs[0])):
        rows = RunQueue([RunJob(c.to_dict(), run_id=run_id_of(c)) for c in cfgs])()
    assert [r["status"] for r in rows] == ["running elsewhere", "completed"]
