"""A dispatch backend added without an edit to ``experiments/``: the toy backend of ``tests/plugins/toy_backend.py``,
installed through the entry-point group ``clip_compress.backends`` (a dist-info folder on ``sys.path``, as pip
would write it), submitted through ``clip-compress sweep``, its setting validated with the config, its refusals
one line before anything runs."""

from __future__ import annotations

import pickle
import sys

import pytest

from compress.results import read_result
from experiments.cli import main
from experiments.sweep import load_sweep
from tests.test_dispatch_backends import manifest
from tests.test_sweep import write_sweep


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy backend installed (an entry point in a dist-info folder on sys.path), removed after the test."""
    import experiments.backends
    from tests.plugins.toy_backend import ToyBackend

    site = tmp_path / "site"
    info = site / "toy_backend-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-backend\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[clip_compress.backends]\ntoy = tests.plugins.toy_backend:ToyBackend\n")
    monkeypatch.setattr(ToyBackend, "queue", [])
    with experiments.backends.scoped():
        assert "toy" not in experiments.backends.backend_names()
        monkeypatch.syspath_prepend(str(site))
        experiments.backends.load_entry_points()
        yield ToyBackend


def test_a_backend_from_an_entry_point_runs_a_sweep(tmp_path, toy, capsys):
    path = write_sweep(tmp_path, seeds=[0, 1], set={"dispatch.toy_queue": "fast"})
    runs = load_sweep(path).runs()
    assert main(["sweep", str(path), "--backend", "toy"]) == 0  # returns at once: the jobs are queued
    assert [(queue, job_id) for queue, job_id, _ in toy.queue] == [("fast", "toy-0"), ("fast", "toy-1")]
    entries = manifest(tmp_path)
    assert [(e["run_id"], e["backend"], e["job_id"]) for e in entries] == [
        (runs[0].run_id, "toy", "toy-0"), (runs[1].run_id, "toy", "toy-1")]
    assert all(read_result(run.run_dir) is None for run in runs)
    for _, _, job in toy.queue:  # the scheduler runs the pickled jobs
        assert pickle.loads(pickle.dumps(job))()["status"] == "completed"
    capsys.readouterr()
    assert main(["sweep", str(path), "--backend", "toy"]) == 0
    assert "nothing to submit: 2 runs skipped" in capsys.readouterr().out
    assert len(toy.queue) == 2 and len(manifest(tmp_path)) == 2


def test_the_backend_setting_is_checked_with_the_config(tmp_path, toy, capsys):
    path = write_sweep(tmp_path, seeds=[0], set={"dispatch.toy_queue": "not a name"})
    assert main(["sweep", str(path), "--backend", "toy"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("clip-compress: error: ")
    assert "dispatch.toy_queue: 'not a name' is not a queue name" in err[0]
    path = write_sweep(tmp_path, seeds=[0], set={"dispatch.toy_queu": "fast"})
    assert main(["sweep", str(path), "--backend", "toy"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key 'dispatch.toy_queu'. Did you mean 'toy_queue'?" in err[0]
    path = write_sweep(tmp_path, seeds=[0], set={"dispatch.nodes": 2})
    assert main(["sweep", str(path), "--backend", "toy"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the toy scheduler has one node" in err[0]
    assert toy.queue == [] and manifest(tmp_path) == []


def test_a_restarted_job_is_recognised_by_the_backend_that_restarts_it(toy, monkeypatch):
    from experiments.backends import restart_count

    assert restart_count() == 0
    monkeypatch.setenv("TOY_RESTARTS", "2")
    assert restart_count() == 2


def test_two_backends_of_one_name_are_refused(toy):
    from experiments.backends import DispatchError, register_backend

    class Other(toy):
        pass

    with pytest.raises(DispatchError, match="backend 'toy' is already registered"):
        register_backend(Other)
    assert "toy" in sys.modules["experiments.backends"].backend_names()


def test_run_submits_one_config_to_the_backend_and_refuses_a_bad_setting_in_one_line(tmp_path, toy, capsys):
    import yaml

    from tests.test_sweep import BASE

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**BASE, "output": {"dir": str(tmp_path / "runs")}}))
    assert main(["run", str(config), "--set", "dispatch.toy_queue=a b", "--backend", "toy"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["clip-compress: error: --set dispatch.toy_queue=a b: dispatch.toy_queue: 'a b' is not a queue name "
                   "(letters, digits, _)"]
    assert toy.queue == []
    assert main(["run", str(config), "--set", "dispatch.toy_queue=slow", "--backend", "toy"]) == 0
    out = capsys.readouterr().out
    assert [(queue, job_id) for queue, job_id, _ in toy.queue] == [("slow", "toy-0")]
    assert "as toy job toy-0" in out and "[submitted]" in out


def test_a_setting_two_backends_declare_differently_or_a_common_key_is_refused(toy):
    from dataclasses import dataclass

    from experiments.backends import DispatchError, register_backend
    from experiments.backends.base import Backend

    @dataclass
    class Clashing:
        timeout_min: str = "1h"  # local's and slurm's is an int of minutes

    @dataclass
    class Common:
        nodes: int = 2

    for settings, message in [(Clashing, "dispatch.timeout_min is declared by backend 'local'"),
                              (Common, "dispatch.nodes is a common key")]:
        other = type("Other", (Backend,), {"name": "other", "Settings": settings})
        with pytest.raises(DispatchError, match=message):
            register_backend(other)


def test_the_engine_alone_keeps_the_backend_settings_as_written(tmp_path):
    """compress knows the common keys only: without ``experiments`` imported, a backend's setting is kept as
    written (it is checked where a run is dispatched, by the backends)."""
    import subprocess

    code = ("import sys\nfrom compress.recipe import config_from_dict\n"
            "cfg = config_from_dict({'teacher': None, 'student': {'model': 'cc-test-student'}, "
            "'inheritance': {'name': 'none'}, 'losses': [{'name': 'clip'}], "
            "'dispatch': {'backend': 'lsf', 'lsf_queue': 'long', 'gpus_per_node': 2}})\n"
            "assert 'experiments' not in sys.modules, 'the engine imported experiments'\n"
            "print(cfg.dispatch.backend, cfg.dispatch.tasks(), cfg.to_dict()['dispatch']['lsf_queue'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["lsf", "2", "long"]


def test_a_dispatch_mistake_is_one_line_before_torch_is_imported(tmp_path):
    """The backends check their settings as the config is parsed: a wrong dispatch key, value or backend in
    ``run`` or ``sweep`` fails in one line without importing torch (as a wrong ``train`` key does)."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    config = root / "experiments" / "configs" / "tiny-test.yaml"
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"name: s\nbase: {config}\nseeds: [0]\n")
    commands = {"unknown key 'dispatch.partiton'": ["run", str(config), "--set", "dispatch.partiton=gpu"],
                "dispatch.mem_gb: must be a number > 0": ["run", str(config), "--set", "dispatch.mem_gb=0"],
                "dispatch.backend: 'slurmm' is not one of": ["sweep", str(sweep), "--set", "dispatch.backend=slurmm"],
                "dispatch.max_parallel: must be at least 1": ["sweep", str(sweep), "--set", "dispatch.max_parallel=0"]}
    for message, argv in commands.items():
        code = ("import sys\nfrom experiments.cli import main\n"
                f"code = main({argv!r})\nprint(code, 'torch' in sys.modules)")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                                env={**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}, timeout=300)
        assert result.stdout.split() == ["2", "False"], (argv, result.stdout, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
