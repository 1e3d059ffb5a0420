"""``clip-compress status`` and ``collect`` on real tiny run directories and hand-made states."""

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from compress.recipe import run_id_of
from compress.run import RunInterrupted, run_dir_for, run_experiment
from compress.rundir import owned_run_dir
from compress.train import Trainer
from experiments.cli import main
from experiments.collect import collect, collect_rows
from experiments.status import find_run_dirs, format_status, read_manifest, run_state, status
from tests.test_run_e2e import tiny_config

TRAIN = {"steps": 4, "batch_size": 8, "lr": 1e-3, "log_every": 1, "checkpoint_every": 1, "progress": False}


def failing_at(step_to_fail: int, error: BaseException):
    """A ``Trainer.train_step`` that raises ``error`` at optimizer step ``step_to_fail`` (0-based)."""
    original = Trainer.train_step

    def train_step(self, batch, step):
        if step == step_to_fail:
            raise error
        return original(self, batch, step)

    return train_step


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Real run directories: completed, failed during training, interrupted, a completed two-stage
    run, a two-stage run failed in its second stage; and a stopped run (killed without a row)."""
    root = tmp_path_factory.mktemp("status")
    out = {}
    out["completed"] = tiny_config(root, name="done")
    run_experiment(out["completed"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "train_step", failing_at(2, RuntimeError("boom at step 2\nsecond line")))
        out["failed"] = tiny_config(root, name="broken", train=TRAIN)
        assert run_experiment(out["failed"])["status"] == "failed"
        out["stopped"] = tiny_config(root, name="killed", train=TRAIN)
        run_experiment(out["stopped"])
    (run_dir_for(out["stopped"]) / "result.json").unlink()  # as if SIGKILL came before the row
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "train_step", failing_at(1, RunInterrupted("stopped by signal SIGTERM")))
        out["interrupted"] = tiny_config(root, name="sigterm", train=TRAIN)
        with pytest.raises(RunInterrupted):
            run_experiment(out["interrupted"])
    two_stages = [{"name": "first", "student": {"model": "cc-test-student"}}, {"name": "second", "steps": 3}]
    out["staged"] = tiny_config(root, name="staged", stages=two_stages)
    assert run_experiment(out["staged"])["status"] == "completed"
    calls = {"n": 0}
    original = Trainer.train_step

    def fail_in_second_stage(self, batch, step):  # stage 0 trains 4 steps, stage 1 fails at its step 1
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("stage two broke")
        return original(self, batch, step)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "train_step", fail_in_second_stage)
        out["staged_failed"] = tiny_config(root, name="staged-broken", stages=two_stages, train=TRAIN)
        assert run_experiment(out["staged_failed"])["status"] == "failed"
    return root / "runs", {key: run_dir_for(cfg) for key, cfg in out.items()}, out


def test_states_steps_and_errors_of_real_runs(runs):
    _, dirs, cfgs = runs
    done = run_state(dirs["completed"])
    assert (done.state, done.step, done.steps, done.error, done.stage) == ("completed", 2, 2, None, None)
    assert (done.run_id, done.name) == (run_id_of(cfgs["completed"]), "done")
    failed = run_state(dirs["failed"])
    assert (failed.state, failed.step, failed.steps) == ("failed", 2, 4)
    assert failed.error == "RuntimeError: boom at step 2"  # one line
    stopped = run_state(dirs["stopped"])
    assert (stopped.state, stopped.step, stopped.steps, stopped.error) == ("stopped", 2, 4, None)
    assert stopped.run_id == run_id_of(cfgs["stopped"]) and stopped.name == "killed"
    interrupted = run_state(dirs["interrupted"])
    assert (interrupted.state, interrupted.step) == ("interrupted", 1)
    assert interrupted.error == "RunInterrupted: stopped by signal SIGTERM"
    staged = run_state(dirs["staged"])
    assert (staged.state, staged.stage, staged.step, staged.steps) == ("completed", "1-second", 3, 3)
    broken = run_state(dirs["staged_failed"])
    # stage 0 took 4 steps (train.steps), stage 1 its own 3 and failed at its second step
    assert (broken.state, broken.stage, broken.step, broken.steps) == ("failed", "1-second", 1, 3)
    assert broken.error == "RuntimeError: stage two broke"


def test_step_of_a_stopped_run_comes_from_its_checkpoint_when_no_metrics(runs, tmp_path):
    _, dirs, _ = runs
    copy = tmp_path / "copy"
    shutil.copytree(dirs["stopped"], copy)
    (copy / "metrics.jsonl").unlink()
    state = run_state(copy)
    assert (state.state, state.step) == ("stopped", 2)  # the checkpoint written after 2 steps
    (copy / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"ste')  # a line torn by a kill
    assert run_state(copy).step == 2


def test_pending_runs(tmp_path):
    assert run_state(tmp_path / "not-there").state == "pending"
    (tmp_path / "queued" / "submitit").mkdir(parents=True)  # the scheduler's logs, nothing of the run yet
    assert run_state(tmp_path / "queued").state == "pending"


def test_running_is_the_lock_held_by_a_live_process_and_the_probe_leaves_it_free(runs, tmp_path):
    _, dirs, cfgs = runs
    run_dir = tmp_path / "copy"
    shutil.copytree(dirs["failed"], run_dir)
    run_id = run_id_of(cfgs["failed"])
    with owned_run_dir(run_dir, run_id):  # another open file description: flock conflicts in-process too
        state = run_state(run_dir)
        assert (state.state, state.pid, state.step, state.error) == ("running", str(os.getpid()), 2, None)
    assert run_state(run_dir).state == "failed"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
         "fcntl.flock(fd, fcntl.LOCK_EX); os.ftruncate(fd, 0); os.pwrite(fd, str(os.getpid()).encode(), 0); "
             "print('held', flush=True); "
         "sys.stdin.read()", str(run_dir / ".lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        for _ in range(3):  # probing never takes the lock for good
            assert (run_state(run_dir).state, run_state(run_dir).pid) == ("running", str(holder.pid))
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert run_state(run_dir).state == "failed"  # the kernel released the dead process's lock
    with owned_run_dir(run_dir, run_id):  # and a run can take the directory again
        pass


def test_a_run_starting_while_its_lock_is_probed_waits_instead_of_being_refused(tmp_path):
    """``status`` holds the lock for an instant: a run starting then takes it once it is free."""
    import fcntl
    import threading

    run_dir = tmp_path / "run"
    with owned_run_dir(run_dir, "abc"):
        pass
    probe = os.open(run_dir / ".lock", os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)  # what lock_holder does, caught in the middle
    release = threading.Timer(0.3, lambda: fcntl.flock(probe, fcntl.LOCK_UN))
    release.start()
    try:
        with owned_run_dir(run_dir, "abc"):
            assert run_state(run_dir).state == "running"
    finally:
        release.join()
        os.close(probe)


def test_find_run_dirs_counts_stage_folders_as_part_of_their_run(runs):
    root, dirs, _ = runs
    assert find_run_dirs(root) == sorted(dirs.values())
    assert find_run_dirs(dirs["staged"]) == [dirs["staged"]]


def test_status_command_prints_the_table_and_the_counts(runs, capsys):
    root, dirs, cfgs = runs
    assert main(["status", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "6 runs: 2 completed, 2 failed, 1 interrupted, 1 stopped"
    by_id = {line.split()[1]: line.split() for line in lines[1:-1]}
    assert by_id[run_id_of(cfgs["failed"])][:5] == ["failed", run_id_of(cfgs["failed"]), "broken", "-", "2/4"]
    assert "RuntimeError: boom at step 2" in " ".join(by_id[run_id_of(cfgs["failed"])])
    assert by_id[run_id_of(cfgs["staged"])][:5] == ["completed", run_id_of(cfgs["staged"]), "staged", "1-second", "3/3"]
    assert by_id[run_id_of(cfgs["stopped"])][:5] == ["stopped", run_id_of(cfgs["stopped"]), "killed", "-", "2/4"]
    assert main(["status", str(root), "--failed"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert sorted(line.split()[1] for line in out[1:-2]) == sorted([run_id_of(cfgs["failed"]),
                                                                    run_id_of(cfgs["staged_failed"])])
    assert out[-1] == "(--failed: 2 of 6 runs: 2 completed, 2 failed, 1 interrupted, 1 stopped)"
    assert main(["status", str(root / "nowhere")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_long_errors_are_cut_in_the_table(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "result.json").write_text(json.dumps({"status": "failed", "error": "E: " + "x" * 300}))
    table = format_status([run_state(tmp_path / "run")])
    assert "x" * 90 in table and "x" * 101 not in table and table.splitlines()[1].endswith("...")


def test_manifest_gives_job_ids_and_lists_runs_not_started(runs, tmp_path, capsys):
    _, dirs, cfgs = runs
    sweep = tmp_path / "sweep"
    shutil.copytree(dirs["completed"], sweep / dirs["completed"].name)
    entry = {"run_id": run_id_of(cfgs["completed"]), "name": "done", "run_dir": str(sweep / dirs["completed"].name),
             "backend": "slurm", "job_id": "4242_0", "submitted_at": "2026-01-01T00:00:00", "git_commit": "abc",
             "git_dirty": False, "values": {"seed": 0}, "config": {}}
    queued = {**entry, "run_id": "feedbeef0000", "name": "later", "run_dir": str(sweep / "later-feedbeef0000"),
              "job_id": "4242_1", "values": {"seed": 1}}
    lines = [json.dumps({**entry, "job_id": "4100_0"}), json.dumps(entry), json.dumps(queued), '{"run_id": "torn']
    (sweep / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    assert read_manifest(sweep / "manifest.jsonl")[entry["run_id"]]["job_id"] == "4242_0"  # the newest line wins
    assert "manifest.jsonl:4: unreadable manifest line skipped" in capsys.readouterr().err
    states = {s.run_id: s for s in status(sweep)}
    assert (states[entry["run_id"]].state, states[entry["run_id"]].job_id) == ("completed", "4242_0")
    later = states["feedbeef0000"]
    assert (later.state, later.job_id, later.name, later.values) == ("pending", "4242_1", "later", {"seed": 1})
    # a single run's folder finds the job id in its sweep's manifest above it
    assert status(sweep / dirs["completed"].name)[0].job_id == "4242_0"
    table = format_status(list(states.values()))
    assert "seed=1" in table and "4242_1" in table


def test_status_of_a_sweep_file_reads_each_runs_folder(runs, tmp_path, monkeypatch):
    """The sweep path through ``experiments.sweep.load_sweep`` (a stand-in with the agreed interface)."""
    _, dirs, cfgs = runs
    unstarted = tiny_config(tmp_path, name="unstarted")
    sweep_runs = [types.SimpleNamespace(cfg=cfgs["failed"], values={"seed": 0}, run_dir=dirs["failed"]),
                  types.SimpleNamespace(cfg=unstarted, values={"seed": 1}, run_dir=run_dir_for(unstarted))]
    fake = types.ModuleType("experiments.sweep")
    fake.load_sweep = lambda path, overrides=(): types.SimpleNamespace(name="s", output_dir=tmp_path,
                                                                         runs=lambda: sweep_runs)
    monkeypatch.setitem(sys.modules, "experiments.sweep", fake)
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"run_id": run_id_of(unstarted), "job_id": "77"}) + "\n")
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text("base: x\n")
    first, second = status(sweep_file)
    assert (first.state, first.values, first.step) == ("failed", {"seed": 0}, 2)
    assert (second.state, second.run_id, second.name, second.job_id) == ("pending", run_id_of(unstarted),
                                                                         "unstarted", "77")


def test_collect_writes_every_row_with_its_kind_and_folder(runs, tmp_path, capsys):
    root, dirs, _ = runs
    out = tmp_path / "results.jsonl"
    assert main(["collect", str(root), "-o", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # 5 run rows (the stopped run has none) and 2 + 2 stage rows
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows) and len(rows) == 9
    assert sum(r["row"] == "run" for r in rows) == 5 and sum(r["row"] == "stage" for r in rows) == 4
    by_path = {r["path"]: r for r in rows}
    assert by_path[str(dirs["failed"])]["status"] == "failed" and by_path[str(dirs["failed"])]["row"] == "run"
    assert by_path[str(dirs["interrupted"])]["status"] == "interrupted"
    stage = by_path[str(dirs["staged_failed"] / "stages" / "1-second")]
    assert (stage["row"], stage["status"], stage["error"]) == ("stage", "failed", "RuntimeError: stage two broke")
    assert by_path[str(dirs["staged_failed"] / "stages" / "0-first")]["status"] == "completed"
    on_disk = json.loads((dirs["completed"] / "result.json").read_text())
    assert {k: v for k, v in by_path[str(dirs["completed"])].items() if k not in ("row", "path")} == on_disk
    printed = capsys.readouterr().out
    assert f"wrote 9 rows to {out}: 5 run, 4 stage rows; 5 completed, 3 failed, 1 interrupted" in printed


def test_collect_reports_and_skips_a_corrupt_result(runs, tmp_path, capsys):
    _, dirs, _ = runs
    copy = tmp_path / "runs"
    for key in ("completed", "failed"):
        shutil.copytree(dirs[key], copy / dirs[key].name)
    (copy / dirs["failed"].name / "result.json").write_text('{"status": "fail')
    out = tmp_path / "out" / "results.jsonl"
    assert collect([copy], out) == 1
    assert json.loads(out.read_text())["status"] == "completed"
    err = capsys.readouterr().err
    assert f"skipped unreadable result.json: {copy / dirs['failed'].name / 'result.json'}" in err
    assert "1 unreadable result.json skipped" in err
    assert run_state(copy / dirs["failed"].name).state == "failed"  # status says it cannot read the row


def test_collect_refuses_paths_without_results(runs, tmp_path, capsys):
    _, dirs, _ = runs
    out = tmp_path / "results.jsonl"
    assert main(["collect", str(tmp_path / "missing"), "-o", str(out)]) == 2
    assert "missing: no such file or directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["collect", str(dirs["completed"]), str(tmp_path / "empty"), "-o", str(out)]) == 2
    assert "empty: holds no result.json" in capsys.readouterr().err
    assert not out.exists()
    # a result.json file, or a run folder, may be given; a run given twice is one row
    rows, unreadable = collect_rows([dirs["completed"] / "result.json", dirs["completed"], dirs["staged"]])
    assert [r["row"] for r in rows] == ["run", "run", "stage", "stage"] and not unreadable


def test_status_and_collect_modules_do_not_import_torch():
    code = "import sys, experiments.status, experiments.collect; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip() == "False"


def test_status_prints_axis_values_as_json_like_the_sweep_dry_run(tmp_path):
    from experiments.sweep import describe

    values = {"train.lr": 0.0003, "losses": [{"name": "clip", "weight": 1.0}], "student.model": "a.json",
              "train.compile": False}
    state = run_state(tmp_path / "not-started")
    state.values = values
    line = format_status([state]).splitlines()[1]
    shown = 'train.lr=0.0003, losses=[{"name": "clip", "weight": 1.0}], student.model="a.json", train.compile=false'
    assert shown in line and describe(values) == shown
