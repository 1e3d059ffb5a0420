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


def test_the_engine_alone_checks_the_dispatch_section(tmp_path):
    """A process that imports only ``compress`` checks the ``dispatch`` section too (the engine loads the dispatch
    layer's check by name): a misspelt setting and an unknown backend are refused by ``load_config`` with the line
    the command line prints, and what is accepted has every backend's defaults filled in."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    config = root / "experiments" / "configs" / "tiny-test.yaml"
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
    for override in ("dispatch.max_paralel=2", "dispatch.backend=slrum"):
        code = ("import sys\nfrom compress.config import ConfigError\nfrom compress.recipe import load_config\n"
                "assert 'experiments' not in sys.modules, 'the engine imported experiments'\n"
                f"try:\n    load_config({str(config)!r}, [{override!r}])\nexcept ConfigError as e:\n    print(e)\n"
                "else:\n    print('accepted')\n")
        engine = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert engine.returncode == 0, engine.stderr[-2000:]
        cli = subprocess.run([sys.executable, "-c", "import sys\nfrom experiments.cli import main\n"
                              f"sys.exit(main(['run', {str(config)!r}, '--set', {override!r}]))"],
                             capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert cli.returncode == 2 and len(cli.stderr.strip().splitlines()) == 1, cli.stderr
        assert cli.stderr.strip() == f"clip-compress: error: {engine.stdout.strip()}", (engine.stdout, cli.stderr)
    code = ("from compress.recipe import load_config\n"
            f"cfg = load_config({str(config)!r}, ['dispatch.backend=local'])\n"
            "print(cfg.dispatch.timeout_min, cfg.to_dict()['dispatch']['max_array_size'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.split() == ["1440", "1000"], out.stderr[-2000:]


def test_submit_checks_the_section_again_for_the_chosen_backend(tmp_path):
    """A config whose ``dispatch`` was changed after it was parsed, or that ``--backend`` sends elsewhere, is
    checked again by ``submit`` before anything is submitted."""
    from compress.config import ConfigError
    from compress.recipe import load_config
    from experiments.dispatch import submit

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    cfg = load_config(root / "experiments" / "configs" / "tiny-test.yaml")
    submitted: list[str] = []
    cfg.dispatch["backend"] = "slrum"
    with pytest.raises(ConfigError, match="dispatch.backend: 'slrum' is not one of .* Did you mean 'slurm'"):
        submit([cfg], "inline", tmp_path, on_submit=lambda cfg, job_id: submitted.append(job_id))
    cfg.dispatch["backend"] = "inline"
    cfg.dispatch["max_paralel"] = 2
    with pytest.raises(ConfigError, match="unknown key 'dispatch.max_paralel'"):
        submit([cfg], "inline", tmp_path, on_submit=lambda cfg, job_id: submitted.append(job_id))
    assert submitted == [] and not any(tmp_path.iterdir())


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


def test_without_a_dispatch_layer_only_inline_and_the_common_keys_are_accepted(monkeypatch):
    """Where the dispatch layer is not installed the engine runs configs in this process only: another backend or
    a backend's setting would have no effect, and is refused in one line."""
    import compress.config.dispatch as dispatch
    from compress.config import ConfigError

    monkeypatch.setattr(dispatch, "BUILTIN_SETTINGS_CHECK", "no_such_dispatch_layer:check")
    dispatch.set_settings_check(None)
    try:
        assert dispatch.DispatchConfig.of({"nodes": 2, "gpus_per_node": 0}).tasks() == 1
        with pytest.raises(ConfigError, match="dispatch.backend: 'slurm' needs the dispatch layer"):
            dispatch.DispatchConfig.of({"backend": "slurm"})
        with pytest.raises(ConfigError, match="unknown key 'dispatch.timeout_min': the dispatch layer"):
            dispatch.DispatchConfig.of({"timeout_min": 5})
    finally:
        dispatch.set_settings_check(None)  # the built-in check again, loaded on the next config
