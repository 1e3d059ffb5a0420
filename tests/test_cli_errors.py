"""Filesystem and device mistakes are one line (``clip-compress: error: ...``), and the dry run refuses what the
run would refuse a second later (issue 16, point 1): ``output.dir`` that is a file, a read-only output folder, a
full disk, a ``train.device`` this machine does not have, a student larger than its teacher under manual
inheritance, a misspelt synthetic zero-shot task, and ``eval`` on a CSV whose columns have other names."""

from __future__ import annotations

import errno
import json
import os
import stat

import pytest
import torch
import yaml
from PIL import Image

import compress.models.export as export
import compress.results as results
import compress.rundir as rundir
from compress.recipe import load_config
from compress.run import run_dir_for
from experiments.cli import main
from tests.test_run_e2e import tiny_config


def write_config(tmp_path, **overrides) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, **overrides).to_dict()))
    return str(path)


def one_line(capsys, argv: list[str], code: int = 2) -> str:
    """Run the command line; it must exit with ``code`` and say one line on stderr, no traceback."""
    capsys.readouterr()
    assert main(argv) == code, argv
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# -- the output folder --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", [[], ["--dry-run"], ["--backend", "debug"]])
def test_an_output_dir_that_is_a_file_is_one_line(tmp_path, capsys, how):
    """Was: NotADirectoryError and a 30-line traceback (the dry run printed a plan; the debug backend failed
    making submitit's folder in the run directory)."""
    a_file = tmp_path / "results"
    a_file.write_text("not a folder")
    config = write_config(tmp_path, output={"dir": str(a_file / "runs")})
    line = one_line(capsys, ["run", config, *how])
    assert line.startswith("clip-compress: error: cannot make the run directory ")
    assert f"{a_file} is a file, not a folder (choose another output.dir)" in line


def test_a_read_only_output_folder_is_one_line(tmp_path, capsys, monkeypatch):
    """A folder without write permission (as root, whom the kernel lets write anyway, ``os.access`` answers
    as it would for another user)."""
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    if os.geteuid() == 0:
        access = os.access
        monkeypatch.setattr(rundir.os, "access", lambda path, mode, *a, **k: (
            False if os.fspath(path) == str(folder) and mode & os.W_OK else access(path, mode, *a, **k)))
    try:
        config = write_config(tmp_path, output={"dir": str(folder)})
        for dry_run in ([], ["--dry-run"]):
            line = one_line(capsys, ["run", config, *dry_run])
            assert line.startswith("clip-compress: error: cannot make the run directory "), line
            assert f"{folder} is not writable by this user (choose another output.dir)" in line
        assert not any(folder.iterdir())
    finally:
        folder.chmod(0o755)


def test_a_run_directory_the_kernel_refuses_is_one_line(tmp_path, capsys, monkeypatch):
    """What only writing shows (root squashed on NFS, an ACL): the first write of the run directory fails."""
    config = write_config(tmp_path)

    def refused(path, text):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(rundir, "atomic_write_text", refused)
    line = one_line(capsys, ["run", config])
    run_dir = run_dir_for(load_config(config))
    assert line == (f"clip-compress: error: cannot write the run directory {run_dir}: permission denied: "
                    f"{run_dir / 'run_id'}")


# -- a full disk --------------------------------------------------------------------------------------------------
def test_a_full_disk_before_the_run_starts_is_one_line(tmp_path, capsys, monkeypatch):
    """The disk is full when the run writes its config (was: OSError and a 44-line traceback); no row can be
    written yet. The diagnosis is the checkpoint's (compress.fileio.write_failure)."""
    import compress.run as run_module

    config = write_config(tmp_path)
    monkeypatch.setattr(run_module, "atomic_write_text", full_disk)
    line = one_line(capsys, ["run", config])
    run_dir = run_dir_for(load_config(config))
    assert line == f"clip-compress: error: cannot write the run directory {run_dir}: no space left on device"
    assert not (run_dir / "result.json").exists()


def test_a_full_disk_while_exporting_is_one_line_and_keeps_the_row(tmp_path, capsys, monkeypatch):
    """safetensors reports a full disk as its own error, not OSError: the run says it in one line, as for a
    checkpoint, and the failed row is written (it was: ``run e2e failed: ...``, not named a full disk)."""
    config = write_config(tmp_path, output={"dir": str(tmp_path / "runs"), "save_checkpoint": False})

    def serializing_fails(*args, **kwargs):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(export, "save_safetensors", serializing_fails)
    line = one_line(capsys, ["run", config], code=1)
    run_dir = run_dir_for(load_config(config))
    assert line.startswith("clip-compress: error: run e2e: no space left on device (RuntimeError: Error while "), line
    assert line.endswith(f"(see {run_dir / 'result.json'})")
    row = json.loads((run_dir / "result.json").read_text())
    assert row["status"] == "failed" and "No space left on device" in row["error"]


def test_a_row_that_cannot_be_written_is_said_in_the_same_line(tmp_path, capsys, monkeypatch):
    """The disk stays full for the row too: one line says both (it was two lines)."""
    config = write_config(tmp_path, output={"dir": str(tmp_path / "runs"), "save_checkpoint": False})
    monkeypatch.setattr(export, "save_safetensors", full_disk)
    monkeypatch.setattr(results, "atomic_write_text", full_disk)
    line = one_line(capsys, ["run", config], code=1)
    run_dir = run_dir_for(load_config(config))
    assert line.startswith("clip-compress: error: run e2e: no space left on device"), line
    assert line.endswith(f"(the failed row could not be written to {run_dir / 'result.json'}: no space left on "
                         "device)")


# -- the device ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dry_run", [False, True])
def test_cuda_on_a_machine_without_cuda_is_one_line(tmp_path, capsys, monkeypatch, dry_run):
    """Was: RuntimeError and a 28-line traceback; the dry run printed a plan."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = write_config(tmp_path, train={"steps": 2, "batch_size": 8, "lr": 1e-3, "progress": False,
                                           "device": "cuda"})
    line = one_line(capsys, ["run", config, *(["--dry-run"] if dry_run else [])])
    assert line.startswith("clip-compress: error: train.device: 'cuda' requested but this machine has no CUDA "
                           "device"), line
    assert line.endswith(": use cpu or auto")
    assert not (tmp_path / "runs").exists()  # refused before anything is written


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_cuda_index_this_machine_does_not_have_is_one_line(tmp_path, capsys, monkeypatch, dry_run):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    config = write_config(tmp_path, train={"steps": 2, "batch_size": 8, "lr": 1e-3, "progress": False,
                                           "device": "cuda:3"})
    line = one_line(capsys, ["run", config, *(["--dry-run"] if dry_run else [])])
    assert line == ("clip-compress: error: train.device: 'cuda:3' requested but this machine has 2 CUDA device(s) "
                    "(cuda:0..cuda:1)")
    assert not (tmp_path / "runs").exists()
    line = one_line(capsys, ["eval", "cc-test-teacher", "--device", "cuda:3"])
    assert line == ("clip-compress: error: --device cuda:3: 'cuda:3' requested but this machine has 2 CUDA device(s) "
                    "(cuda:0..cuda:1)")


@pytest.mark.parametrize("backend", ["local", "debug"])
def test_cuda_on_a_machine_without_cuda_is_one_line_for_the_backends_here(tmp_path, capsys, monkeypatch, backend):
    """Was (local): ``[submitted] ...``, exit 1 and not a word (the traceback only in submitit's log), no row."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = write_config(tmp_path, train={"steps": 2, "batch_size": 8, "lr": 1e-3, "progress": False,
                                           "device": "cuda"})
    line = one_line(capsys, ["run", config, "--backend", backend])
    assert line.startswith("clip-compress: error: train.device: 'cuda' requested but this machine has no CUDA "
                           "device"), line
    assert not (tmp_path / "runs").exists()  # refused before submitit's folder is made


def test_a_local_job_without_gpus_refuses_cuda(tmp_path, capsys, monkeypatch):
    """``dispatch.gpus_per_node: 0``: the local job runs with ``CUDA_VISIBLE_DEVICES`` empty, so ``cuda`` there
    fails although this machine has a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    config = write_config(tmp_path, train={"steps": 2, "batch_size": 8, "lr": 1e-3, "progress": False,
                                           "device": "cuda"}, dispatch={"gpus_per_node": 0})
    line = one_line(capsys, ["run", config, "--backend", "local"])
    assert line == ("clip-compress: error: train.device: 'cuda' but dispatch.gpus_per_node is 0: a local job then "
                    "sees no GPU (CUDA_VISIBLE_DEVICES is empty); set dispatch.gpus_per_node, or train.device: cpu "
                    "or auto")
    assert not (tmp_path / "runs").exists()


def test_a_failed_local_run_is_said_in_one_line(tmp_path, capsys):
    """Was: ``[submitted] ...`` and exit 1 without a word (the error only in the row and submitit's log)."""
    config = write_config(tmp_path, data={"train": {"kind": "csv", "path": str(tmp_path / "missing.csv")}})
    line = one_line(capsys, ["run", config, "--backend", "local"], code=1)
    result = run_dir_for(load_config(config)) / "result.json"
    assert line == (f"clip-compress: run e2e failed: DataError: CSV data set: file not found: "
                    f"{tmp_path / 'missing.csv'} (see {result})")
    assert json.loads(result.read_text())["status"] == "failed"


def test_the_dry_run_of_a_cluster_run_leaves_the_device_to_the_node(tmp_path, capsys, monkeypatch):
    """A SLURM run's device is its node's: a login node without a GPU plans it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = write_config(tmp_path, train={"steps": 2, "batch_size": 8, "lr": 1e-3, "progress": False,
                                           "device": "cuda"})
    assert main(["run", config, "--dry-run", "--backend", "slurm"]) == 0
    assert "plan of e2e" in capsys.readouterr().out


# -- what the dry run must refuse as the run does -----------------------------------------------------------------
def test_a_student_larger_than_its_teacher_is_refused_by_the_dry_run(tmp_path, capsys):
    """Manual inheritance takes leading slices: the dry run asks the strategy's own check (on meta models) and
    refuses in one line; the run refuses the same line before it starts (it wrote a failed row, exit 1)."""
    config = write_config(tmp_path, teacher={"model": "cc-test-student", "random_init": True},
                          student={"model": "cc-test-teacher"})
    line = one_line(capsys, ["run", config, "--dry-run"])
    assert line.startswith("clip-compress: error: student: manual inheritance takes leading slices, so the student "
                           "must be no larger than its source"), line
    assert "text layers (text_cfg.layers): student 4 > source 2; vision width (vision_cfg.width): student 64 > " \
           "source 48" in line
    for backend in ("inline", "debug"):  # was: a failed row and exit 1; now the dry run's check, before the run
        assert one_line(capsys, ["run", config, "--backend", backend]) == line
    assert not (tmp_path / "runs").exists()  # no row, no submitit folder


def test_a_stage_whose_student_is_larger_than_the_previous_one_is_refused_by_the_dry_run(tmp_path, capsys):
    config = write_config(tmp_path, student={"model": "cc-test-student"},
                          stages=[{"name": "small"}, {"name": "big", "source": "previous",
                                                      "student": {"model": "cc-test-teacher"}}])
    line = one_line(capsys, ["run", config, "--dry-run"])
    assert line.startswith("clip-compress: error: stages[1].student: manual inheritance takes leading slices"), line


def test_a_misspelt_synthetic_task_is_refused_before_the_run(tmp_path, capsys):
    """Was: a plan (dry run), then a failed run after the teacher was loaded."""
    config = write_config(tmp_path)
    for dry_run in (["--dry-run"], []):
        line = one_line(capsys, ["run", config, "--set", "eval.zero_shot.0.task=colour_shape", *dry_run])
        assert line.endswith("eval.zero_shot[0].task: 'colour_shape' is not a synthetic task (known: shape, color, "
                             "color_shape). Did you mean 'color_shape' or 'shape' or 'color'?"), line
    assert not (tmp_path / "runs").exists()


# -- eval on a CSV ------------------------------------------------------------------------------------------------
def test_eval_names_the_columns_of_a_csv(tmp_path, capsys):
    """``eval`` reads a CSV with the data config's keys (image_key, caption_key, separator); a wrong column
    name is one line naming the columns found (it was a 40-line traceback, and the columns could not be named)."""
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 0, 0)).save(tmp_path / f"{i}.png")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("image;caption\n" + "".join(f"{i}.png;a red square {i}\n" for i in range(4)))
    import compress.evaluation.standalone as standalone

    with pytest.MonkeyPatch.context() as patch:  # the header is read before the model is loaded
        patch.setattr(standalone, "load_model", lambda *a, **k: pytest.fail("the model was loaded first"))
        line = one_line(capsys, ["eval", "cc-test-teacher", "--data", str(pairs), "--no-throughput"])
    assert line.startswith(f"clip-compress: error: --data {pairs}: no column 'filepath' or 'title'; its columns are "
                           "'image;caption': name them with --image-key and --caption-key"), line
    line = one_line(capsys, ["eval", "cc-test-teacher", "--data", str(pairs), "--no-throughput", "--separator", ";",
                             "--image-key", "image"])
    assert line.startswith(f"clip-compress: error: --data {pairs}: no column 'title'; its columns are 'image', "
                           "'caption'"), line
    out = tmp_path / "metrics.json"
    assert main(["eval", "cc-test-teacher", "--data", str(pairs), "--no-throughput", "--separator", ";",
                 "--image-key", "image", "--caption-key", "caption", "--output", str(out)]) == 0
    assert "ret/val/i2t_r1" in json.loads(out.read_text())
    line = one_line(capsys, ["eval", "cc-test-teacher", "--image-key", "image"])
    assert line == "clip-compress: error: --image-key: name the columns of a CSV given with --data"
    line = one_line(capsys, ["eval", "cc-test-teacher", "--data", str(tmp_path), "--caption-key", "caption"])
    assert line == ("clip-compress: error: --caption-key: only for a CSV / TSV of image-text pairs (--kind csv), not "
                    "for --kind folder")


# -- output paths outside run directories (refused before any compute) --------------------------------------------
def _must_not_run(*args, **kwargs):
    raise AssertionError("computed before the output path was checked")


def _hand_written_row(root) -> None:
    run = root / "runs" / "r0"
    run.mkdir(parents=True)
    (run / "result.json").write_text(json.dumps({"run_id": "r0", "name": "r", "status": "completed",
                                                 "config": {"name": "r", "seed": 0}, "metrics": {"params": 1}}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2)))


def test_an_eval_output_that_is_a_folder_is_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """Was: IsADirectoryError and a traceback after the whole evaluation ran."""
    import compress.evaluation.standalone as standalone

    monkeypatch.setattr(standalone, "load_model", _must_not_run)
    line = one_line(capsys, ["eval", "cc-test-teacher", "--output", str(tmp_path)])
    assert line == f"clip-compress: error: --output: cannot write {tmp_path}: {tmp_path} is a folder, not a file"


def test_plot_table_and_collect_outputs_under_a_file_are_one_line(tmp_path, capsys):
    """Was: FileExistsError / NotADirectoryError from mkdir, a traceback."""
    _hand_written_row(tmp_path)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    runs = str(tmp_path / "runs")
    for argv, out in ((["table", runs, "--rows", "name", "--value", "params"], a_file / "t.md"),
                      (["plot", runs, "--kind", "curves"], a_file / "c.png"),
                      (["plot", runs, "--kind", "pareto", "--y", "params"], a_file / "sub" / "p.png"),
                      (["collect", runs], a_file / "rows.jsonl")):
        line = one_line(capsys, [*argv, "-o", str(out)])
        assert line == f"clip-compress: error: -o/--output: cannot write {out}: {a_file} is a file, not a folder", line


def test_a_write_that_fails_in_a_command_is_one_line(tmp_path, capsys, monkeypatch):
    """An OSError no check foresaw (here a full disk while ``table`` writes) is one line, exit 2."""
    import compress.fileio as fileio

    _hand_written_row(tmp_path)
    out = tmp_path / "t.md"

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(fileio, "atomic_write_text", full)
    line = one_line(capsys, ["table", str(tmp_path / "runs"), "--rows", "name", "--value", "params", "-o", str(out)])
    assert line == f"clip-compress: error: {out}: no space left on device"


def test_demo_results_that_are_a_file_are_refused_before_the_teacher_trains(tmp_path, capsys, monkeypatch):
    """Was: the teacher's training started before anything was refused."""
    import experiments.demo as demo

    monkeypatch.setattr(demo, "train_teacher", _must_not_run)
    a_file = tmp_path / "results"
    a_file.write_text("not a folder")
    line = one_line(capsys, ["demo", "--quick", "--results", str(a_file), "--cache-dir", str(tmp_path / "cache")])
    assert line == (f"clip-compress: error: --results: cannot write {a_file / 'quick'}: {a_file} is a file, not a "
                    "folder")


@pytest.mark.parametrize("dry_run", [False, True])
def test_mps_on_a_machine_without_it_is_one_line(tmp_path, capsys, monkeypatch, dry_run):
    """Was: accepted by validation and the dry run, then a failed run (exit 1) and a failed row."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    config = write_config(tmp_path, train={"steps": 2, "batch_size": 8, "lr": 1e-3, "progress": False,
                                           "device": "mps"})
    line = one_line(capsys, ["run", config, *(["--dry-run"] if dry_run else [])])
    assert line == ("clip-compress: error: train.device: 'mps' requested but this machine has no MPS (Apple GPU) "
                    "device: use cpu or auto")
    assert not (tmp_path / "runs").exists()


def test_mps_where_torch_has_it_is_kept(monkeypatch):
    from compress.precision import available_device, resolve_device

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert available_device(torch.device("mps")) == torch.device("mps") == resolve_device("mps")
