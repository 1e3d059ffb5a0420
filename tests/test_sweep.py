"""Sweep files: expansion (product, zip, seeds, exclusions), run ids, refusals, dry run, manifest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from compress.config import ConfigError
from compress.recipe import config_from_dict, run_id_of
from compress.run import run_dir_for
from experiments.cli import main
from experiments.status import MANIFEST_FILE, read_manifest
from experiments.sweep import SweepError, load_sweep

#: a tiny base run: one step on the tiny towers, a minimal evaluation (about 2 s on the CPU)
BASE: dict[str, Any] = {
    "name": "base",
    "teacher": {"model": "cc-test-teacher", "random_init": True},
    "student": {"model": "cc-test-student"},
    "losses": [{"name": "affinity"}],
    "schedules": {"lr": {"name": "warmup_cosine", "warmup_steps": 0}},
    "data": {"train": {"kind": "synthetic", "num_samples": 16}},
    "train": {"steps": 1, "batch_size": 4, "lr": 1e-3, "log_every": 1, "progress": False},
    "eval": {"retrieval": False, "macs": False, "throughput": False},
    "output": {"dir": "ignored-by-sweeps"},
}


def write_sweep(tmp_path: Path, name: str = "abl", base: dict[str, Any] | None = None, **sweep: Any) -> Path:
    """A base config in ``tmp_path/configs/base.yaml`` and a sweep beside it (``base: base.yaml``)."""
    folder = tmp_path / "configs"
    folder.mkdir(exist_ok=True)
    (folder / "base.yaml").write_text(yaml.safe_dump(base or BASE))
    data = {"name": name, "base": "base.yaml", "output_dir": str(tmp_path / "runs" / name), **sweep}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_axes_zip_seeds_and_exclusions_expand_in_order(tmp_path):
    path = write_sweep(
        tmp_path,
        axes={"train.lr": [1.0e-3, 3.0e-4], "losses": [[{"name": "affinity"}], [{"name": "clip"}]]},
        zip=[{"train.batch_size": [4, 8], "train.weight_decay": [0.1, 0.0]}],
        seeds=[0, 1],
        exclude=[{"train.lr": 3.0e-4, "losses": [{"name": "clip"}]}],
    )
    runs = load_sweep(path).runs()
    grid = [(lr, loss, bs, wd, seed) for lr in (1e-3, 3e-4) for loss in ("affinity", "clip")
            for bs, wd in ((4, 0.1), (8, 0.0)) for seed in (0, 1) if not (lr == 3e-4 and loss == "clip")]
    got = [(r.cfg.train.lr, r.cfg.losses[0]["name"], r.cfg.train.batch_size, r.cfg.train.weight_decay, r.cfg.seed)
           for r in runs]
    assert got == grid and len(runs) == 12
    first = runs[0]
    assert first.values == {"train.lr": 1e-3, "losses": [{"name": "affinity"}], "train.batch_size": 4,
                            "train.weight_decay": 0.1, "seed": 0}
    # each run is the base config with its values set, nothing else changed (an independent build)
    expected = config_from_dict({**BASE, "name": "abl", "seed": 0, "output": {"dir": str(tmp_path / "runs" / "abl")},
                                 "train": {**BASE["train"], "batch_size": 4, "weight_decay": 0.1}})
    assert first.run_id == run_id_of(expected)
    assert first.run_dir == run_dir_for(first.cfg) and first.run_dir.parent == tmp_path / "runs" / "abl"
    assert first.run_dir.name == f"abl-lr=0.001_losses=affinity_batch_size=4_weight_decay=0.1_seed=0-{first.run_id}"
    assert len({r.run_dir for r in runs}) == len(runs)


def test_the_same_sweep_gives_the_same_run_ids(tmp_path):
    path = write_sweep(tmp_path, axes={"train.lr": [1.0e-3, 3.0e-4]}, seeds=[0, 1])
    first = [(r.run_id, r.run_dir) for r in load_sweep(path).runs()]
    again = [(r.run_id, r.run_dir) for r in load_sweep(path).runs()]
    assert first == again and len(set(first)) == 4


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ({"axes": {"train.lr": [1.0e-3]}, "grid": {}}, "unknown sweep key 'grid'"),
        ({"zip": [{"train.lr": [1.0e-3, 2.0e-3], "seed": [0]}]}, "zipped lists must have equal lengths"),
        ({"axes": {"train.lr": [1.0e-3]}, "zip": [{"train.lr": [2.0e-3]}]}, "'train.lr' is in two axes"),
        ({"axes": {"seed": [0]}, "seeds": [1, 2]}, "'seed' is in two axes"),
        ({"axes": {"train.lr": [1.0e-3]}, "set": {"train.lr": 2.0e-3}}, "'train.lr' is both an axis and in set"),
        ({"axes": {"train": [{"lr": 1.0e-3}], "train.lr": [1.0e-3]}}, "overlap"),
        ({"axes": {"train.lr": [1.0e-3]}, "exclude": [{"seed": 0}]}, "'seed' is not an axis"),
        ({"axes": {"train.lr": [1.0e-3]}, "exclude": [{"train.lr": 5.0e-3}]}, "is not one of the axis's values"),
        ({"zip": [{"train.lr": [1.0e-3, 2.0e-3], "train.batch_size": [4, 8]}],
          "exclude": [{"train.lr": 1.0e-3, "train.batch_size": 8}]}, "matches no run"),
        ({"axes": {"train.lr": [1.0e-3]}, "exclude": [{"train.lr": 1.0e-3}]}, "expands to no runs"),
        ({"axes": {"train.lr": []}}, "expands to no runs"),
        ({"axes": {"train.progress": [True, False]}}, "are the same experiment"),
        ({"axes": {"train.lr": [1.0e-3, -1.0]}}, "run 1 (train.lr=-1.0): train.lr: must be a finite number >= 0"),
        ({"axes": {"train.lrr": [1.0e-3]}}, "unknown key 'train.lrr'"),
        ({"set": {"name": "x"}}, "'name' is set by the sweep"),
        ({"axes": {"output.dir": ["a", "b"]}}, "'output.dir' is set by the sweep"),
        ({"seeds": [0, 1.5]}, "seeds: expected a list of integers"),
    ],
)
def test_invalid_sweeps_are_refused_with_one_line(tmp_path, sweep, message):
    path = write_sweep(tmp_path, **sweep)
    with pytest.raises(SweepError) as error:
        load_sweep(path)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert isinstance(error.value, ConfigError) and str(path) in str(error.value)
    assert not (tmp_path / "runs").exists()


def test_cli_set_applies_to_every_run_and_may_not_name_an_axis(tmp_path):
    path = write_sweep(tmp_path, axes={"train.lr": [1.0e-3, 3.0e-4]})
    assert {r.cfg.train.steps for r in load_sweep(path, ["train.steps=3"]).runs()} == {3}
    with pytest.raises(SweepError, match="'train.lr' is both an axis and in --set"):
        load_sweep(path, ["train.lr=1e-2"])


def test_a_key_written_twice_in_a_sweep_or_its_base_is_refused(tmp_path):
    path = write_sweep(tmp_path, axes={"train.lr": [1.0e-3]})
    path.write_text(path.read_text() + "axes:\n  seed: [0, 1]\n")
    with pytest.raises(SweepError) as error:
        load_sweep(path)
    assert str(error.value) == f"{path}: duplicate key 'axes' (lines 4 and 7)"
    path = write_sweep(tmp_path, axes={"train.lr": [1.0e-3]})
    base = tmp_path / "configs" / "base.yaml"
    base.write_text(base.read_text() + "name: again\n")
    with pytest.raises(SweepError, match=r"base.yaml: duplicate key 'name' \(lines \d+ and \d+\)$"):
        load_sweep(path)


def test_a_set_error_of_a_sweep_names_the_override(tmp_path, capsys):
    path = write_sweep(tmp_path, axes={"train.lr": [1.0e-3, 3.0e-4]})
    assert main(["sweep", str(path), "--dry-run", "--set", "train.stepz=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("clip-compress: error: --set train.stepz=3: unknown key 'train.stepz'")


def test_an_invalid_sweep_is_a_one_line_error_of_the_cli(tmp_path, capsys):
    path = write_sweep(tmp_path, zip=[{"train.lr": [1.0e-3, 2.0e-3], "seed": [0]}])
    assert main(["sweep", str(path), "--backend", "inline"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "zipped lists must have equal lengths" in err[0]


def test_dry_run_prints_the_table_and_writes_nothing(tmp_path, capsys):
    path = write_sweep(tmp_path, axes={"train.lr": [1.0e-3, 3.0e-4]}, seeds=[0, 1])
    runs = load_sweep(path).runs()
    assert main(["sweep", str(path), "--backend", "slurm", "--dry-run"]) == 0  # no SLURM needed
    out = capsys.readouterr().out
    for run in runs:
        line = next(x for x in out.splitlines() if run.run_id in x)
        assert line.split()[0] == str(run.index) and "pending" in line and "submit (slurm)" in line
        assert f"train.lr={run.cfg.train.lr}" in line and f"seed={run.cfg.seed}" in line
    assert "4 to submit, 0 skipped" in out
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_sweep_refuses_what_its_runs_would_before_the_first(tmp_path, capsys, monkeypatch, dry_run):
    """The run's pre-run checks, once, before anything is submitted or written. Was: the dry run said "2 to
    submit ... nothing written", and the sweep printed one ``[error] ... RunDirError`` line per run, exit 1."""
    import torch

    a_file = tmp_path / "results"
    a_file.write_text("not a folder")
    how = ["--dry-run"] if dry_run else []
    path = write_sweep(tmp_path, axes={"train.lr": [1.0e-3, 3.0e-4]}, output_dir=str(a_file / "abl"))
    assert main(["sweep", str(path), "--backend", "inline", *how]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("clip-compress: error: cannot make the run directory "), err
    assert f"{a_file} is a file, not a folder" in err[0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = write_sweep(tmp_path, axes={"train.lr": [1.0e-3, 3.0e-4]}, set={"train.device": "cuda"})
    assert main(["sweep", str(path), "--backend", "inline", *how]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [captured.err.strip()]
    assert captured.err.startswith("clip-compress: error: train.device: 'cuda' requested but this machine has no "
                                   "CUDA device"), captured.err
    assert "to submit" not in captured.out and not (tmp_path / "runs").exists()
    assert main(["sweep", str(path), "--backend", "slurm", *(["--dry-run"])]) == 0  # the node's device: not here


def test_manifest_lines_hold_the_run_the_job_and_the_code(tmp_path, capsys):
    path = write_sweep(tmp_path, axes={"train.lr": [1.0e-3, 3.0e-4]})
    runs = load_sweep(path).runs()
    assert main(["sweep", str(path), "--backend", "inline"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "runs" / "abl" / MANIFEST_FILE).read_text().splitlines()]
    assert [x["run_id"] for x in lines] == [r.run_id for r in runs]
    for entry, run in zip(lines, runs, strict=True):
        assert set(entry) == {"run_id", "name", "run_dir", "backend", "job_id", "submitted_at", "git_commit",
                              "git_dirty", "values", "config"}
        assert entry["run_dir"] == str(run.run_dir) and entry["backend"] == "inline" and entry["name"] == "abl"
        assert entry["values"] == run.values and run_id_of(config_from_dict(entry["config"])) == run.run_id
        assert len(entry["git_commit"]) == 40 and isinstance(entry["git_dirty"], bool)  # the tests run in a checkout
        assert entry["submitted_at"][:2] == "20" and "T" in entry["submitted_at"]
    assert read_manifest(tmp_path / "runs" / "abl" / MANIFEST_FILE).keys() == {r.run_id for r in runs}


SHIPPED = sorted((Path(__file__).parents[1] / "experiments" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_sweeps_expand_and_dry_run(path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # relative output dirs land here (and nothing may)
    runs = load_sweep(path).runs()
    assert len(runs) >= 8 and len({r.run_id for r in runs}) == len(runs)
    assert main(["sweep", str(path), "--dry-run"]) == 0
    assert f"{len(runs)} to submit" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_there_are_shipped_sweeps():
    assert {p.name for p in SHIPPED} >= {"tiny-ablation.yaml", "tinyclip-loss-ablation.yaml"}


def test_an_edited_sweep_finds_its_finished_runs_by_run_id(tmp_path, capsys):
    """Swapping two axes, or adding an axis of the base value, renames every run's directory but changes
    no run id: the runs keep their directories and nothing runs again."""
    path = write_sweep(tmp_path, axes={"train.lr": [1.0e-3, 3.0e-4], "train.batch_size": [4]})
    runs = load_sweep(path).runs()
    assert main(["sweep", str(path), "--backend", "inline"]) == 0
    stamps = [(r.run_dir / "result.json").stat().st_mtime_ns for r in runs]
    for axes in ({"train.batch_size": [4], "train.lr": [1.0e-3, 3.0e-4]},
                 {"train.batch_size": [4], "train.lr": [1.0e-3, 3.0e-4], "train.steps": [1]}):
        path = write_sweep(tmp_path, axes=axes)
        edited = load_sweep(path).runs()
        assert [(r.run_id, r.run_dir) for r in edited] == [(r.run_id, r.run_dir) for r in runs]
        capsys.readouterr()
        assert main(["sweep", str(path), "--backend", "inline"]) == 0
        assert "nothing to submit: 2 runs skipped" in capsys.readouterr().out
    assert [(r.run_dir / "result.json").stat().st_mtime_ns for r in runs] == stamps
    assert sorted(p.name for p in (tmp_path / "runs" / "abl").iterdir()) == sorted(
        [MANIFEST_FILE, *(r.run_dir.name for r in runs)])
    # a run not started yet is named after the file as it is now
    path = write_sweep(tmp_path, axes={"train.batch_size": [4], "train.lr": [1.0e-3, 2.0e-4]})
    new = load_sweep(path).runs()[1]
    assert new.run_dir.name == f"abl-batch_size=4_lr=0.0002-{new.run_id}"
