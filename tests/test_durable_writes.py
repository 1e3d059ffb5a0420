"""Checkpoints and rows on disk survive a node crash and a full disk; ``--force`` leaves nothing of the attempt
before (compress.fileio, compress.checkpoint, compress.run)."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import compress.checkpoint as checkpoint_module
from compress.checkpoint import CheckpointWriteError, latest_checkpoint, write_checkpoint
from compress.fileio import atomic_write_text
from compress.models import load_model
from compress.run import run_dir_for
from tests.test_run_e2e import tiny_config


def record_disk_events(monkeypatch) -> list[tuple[str, str]]:
    """(event, path) in order: ``fsync`` (the path of the synced fd), ``replace`` (the target), ``rmtree``."""
    events: list[tuple[str, str]] = []
    fsync, replace, rmtree = os.fsync, os.replace, shutil.rmtree

    def recording_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def recording_replace(src, dst, *args, **kwargs):
        events.append(("replace", str(dst)))
        events.append(("replaced-from", str(src)))
        return replace(src, dst, *args, **kwargs)

    def recording_rmtree(path, *args, **kwargs):
        events.append(("rmtree", str(path)))
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    monkeypatch.setattr(checkpoint_module.shutil, "rmtree", recording_rmtree)
    return events


def synced_before(events: list[tuple[str, str]], index: int, path: str) -> bool:
    return ("fsync", path) in events[:index]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads fd paths from /proc")
def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = record_disk_events(monkeypatch)
    atomic_write_text(tmp_path / "result.json", "{}")
    (replaced,) = [i for i, (kind, _) in enumerate(events) if kind == "replace"]
    tmp_name = events[replaced + 1][1]
    assert synced_before(events, replaced, tmp_name)  # the data is on disk before the name points at it
    assert ("fsync", str(tmp_path)) in events[replaced:]  # the rename itself is on disk when it returns


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads fd paths from /proc")
def test_the_previous_checkpoint_goes_only_after_the_new_one_and_latest_are_on_disk(tmp_path, monkeypatch):
    student = load_model("cc-test-student")
    meta = {"run_id": "r", "config_sha": "c"}
    write_checkpoint(tmp_path, 1, student, {"x": torch.zeros(2)}, meta)
    events = record_disk_events(monkeypatch)
    write_checkpoint(tmp_path, 2, student, {"x": torch.ones(2)}, meta)
    root = tmp_path / "checkpoints"
    removed = events.index(("rmtree", str(root / "step-00000001")))
    new = root / "step-00000002"
    for name in ("student.safetensors", "student.json", "state.pt", "meta.json"):  # every file, before its rename
        replaced = max(i for i, (kind, path) in enumerate(events) if kind == "replace" and path.endswith("/" + name))
        assert synced_before(events, replaced, events[replaced + 1][1]), name
    folder = events.index(("replace", str(new)))
    assert synced_before(events, folder, events[folder + 1][1])  # the new folder, before its rename
    latest = events.index(("replace", str(root / "latest")))
    assert folder < latest < removed
    assert synced_before(events, latest, str(root))  # the new folder's name is on disk before latest names it
    assert synced_before(events, latest, events[latest + 1][1])  # latest's content, before its rename
    assert synced_before(events, removed, str(root)) and events.index(("fsync", str(root)), latest) < removed
    assert latest_checkpoint(tmp_path).step == 2


@pytest.mark.parametrize("fails_at", ["fsync", "latest"])
def test_a_failure_while_switching_leaves_latest_naming_a_loadable_checkpoint(tmp_path, monkeypatch, fails_at):
    student = load_model("cc-test-student")
    meta = {"run_id": "r", "config_sha": "c"}
    write_checkpoint(tmp_path, 1, student, {"x": torch.zeros(2)}, meta)
    fsync, write_text = os.fsync, checkpoint_module.atomic_write_text

    def failing_fsync(fd):  # the disk reports the new checkpoint's data lost (EIO on fsync)
        if "state.pt" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, "Input/output error")
        return fsync(fd)

    def failing_latest(path, text):  # a crash while latest is switched
        if Path(path).name == "latest":
            raise KeyboardInterrupt("killed while switching latest")
        return write_text(path, text)

    with monkeypatch.context() as patch:
        if fails_at == "fsync":
            patch.setattr(os, "fsync", failing_fsync)
            with pytest.raises(CheckpointWriteError, match="input/output error while writing checkpoint step-0000"):
                write_checkpoint(tmp_path, 2, student, {"x": torch.ones(2)}, meta)
        else:
            patch.setattr(checkpoint_module, "atomic_write_text", failing_latest)
            with pytest.raises(KeyboardInterrupt):
                write_checkpoint(tmp_path, 2, student, {"x": torch.ones(2)}, meta)
    kept = latest_checkpoint(tmp_path)
    assert kept.step == 1 and torch.equal(kept.state()["x"], torch.zeros(2))
    assert kept.student_state().keys() == student.state_dict().keys()
    if fails_at == "fsync":  # a write that failed removes its partial folder
        assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-00000001"]


# -- a full disk during a checkpoint, through the command line ------------------------------------------------------
def cli_config(tmp_path: Path) -> Path:
    cfg = tiny_config(tmp_path, train={"steps": 5, "batch_size": 8, "lr": 1e-3, "log_every": 1, "progress": False,
                                       "checkpoint_every": 2})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


@pytest.mark.parametrize("error", ["oserror", "torch-runtime-error"])
def test_a_full_disk_while_checkpointing_frees_the_space_keeps_the_row_and_says_one_line(tmp_path, monkeypatch,
                                                                                          capsys, error):
    """The second checkpoint meets a full disk (OSError ENOSPC; or torch.save's RuntimeError, which is how torch
    reports it). The disk stays full while the partial checkpoint folder exists: the row can only be written once
    it is removed."""
    import compress.models.export as export
    import compress.results as results
    from compress.recipe import load_config
    from experiments.cli import main

    path = cli_config(tmp_path)
    run_dir = run_dir_for(load_config(path))
    partial = lambda: list((run_dir / "checkpoints").glob(".tmp-*"))  # noqa: E731
    write_result_text, save, torch_save = results.atomic_write_text, export.save_safetensors, torch.save

    def full_disk():
        return OSError(errno.ENOSPC, "No space left on device")

    def weights_then_full(state, target, metadata=None):
        if "step-00000004" in str(target) and error == "oserror":
            Path(target).write_bytes(b"\0" * 4096)  # part of the weights, then the disk is full
            raise full_disk()
        return save(state, target, metadata)

    def torch_save_full(obj, target, *args, **kwargs):
        if "step-00000004" in str(target):
            raise RuntimeError("[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed writing file "
                               "data/0: file write failed")
        return torch_save(obj, target, *args, **kwargs)

    def row_needs_space(target, text):
        if partial():
            raise full_disk()
        return write_result_text(target, text)

    with monkeypatch.context() as patch:
        patch.setattr(export, "save_safetensors", weights_then_full)
        if error != "oserror":
            patch.setattr(torch, "save", torch_save_full)
        patch.setattr(results, "atomic_write_text", row_needs_space)
        capsys.readouterr()
        assert main(["run", str(path)]) == 1  # as any failed run
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("clip-compress:")]
    assert line.startswith("clip-compress: error: run e2e: no space left on device while writing checkpoint "
                           "step-00000004"), line
    assert "the previous checkpoint step-00000002 is kept" in line
    assert not partial()  # the space is free again
    row = json.loads((run_dir / "result.json").read_text())
    assert row["status"] == "failed" and "no space left on device" in row["error"]
    assert latest_checkpoint(run_dir).step == 2
    assert main(["run", str(path)]) == 0  # space again: the same command resumes
    assert "(step 2 of 5)" in capsys.readouterr().err


# -- --force ----------------------------------------------------------------------------------------------------------
def test_force_removes_every_file_of_the_attempt_before(tmp_path, monkeypatch):
    """A completed run's folder, then a forced attempt that fails in its first step: the folder holds what a
    fresh attempt failing there holds, nothing of the completed run (its structure report included)."""
    from compress.train import Trainer
    from experiments.job import RunJob

    auto = {"name": "auto", "target_sparsity": 0.5, "prune_step": 2, "ramp_steps": 1, "mask_lr": 0.5,
            "lambda_lr": 1.0, "round_to": 1}
    train = {"steps": 3, "batch_size": 8, "lr": 1e-3, "log_every": 1, "progress": False}
    cfg = tiny_config(tmp_path, inheritance=auto, student=None, train=train)
    fresh = tiny_config(tmp_path, inheritance=auto, student=None, train=train, output={"dir": str(tmp_path / "fresh")})
    assert RunJob(cfg.to_dict())()["status"] == "completed"
    run_dir = run_dir_for(cfg)
    assert (run_dir / "structure.md").is_file() and (run_dir / "structure.png").is_file()

    def fails(self, batch, step):
        raise ValueError("the data went away")

    monkeypatch.setattr(Trainer, "train_step", fails)
    assert RunJob(cfg.to_dict(), force=True)()["status"] == "failed"
    assert RunJob(fresh.to_dict())()["status"] == "failed"

    def files(folder: Path) -> set[str]:
        return {str(p.relative_to(folder)) for p in folder.rglob("*")}

    assert files(run_dir) == files(run_dir_for(fresh))
    assert not (run_dir / "structure.md").exists() and not (run_dir / "structure.png").exists()


def test_the_report_files_force_removes_are_the_ones_the_report_writes():
    from analysis.structure_report import HEATMAP_FILE, TABLE_FILE
    from compress.rundir import REPORT_FILES

    assert set(REPORT_FILES) == {TABLE_FILE, HEATMAP_FILE}
