"""Live tracking (``train.report_to``): TensorBoard and W&B get the records of ``metrics.jsonl``, across a resume."""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
import types
from pathlib import Path

import pytest

from compress.config import ConfigError
from compress.recipe import run_id_of
from compress.run import run_dir_for, run_experiment
from tests.test_resume import Stop, config, stop_at
from tests.test_run_e2e import tiny_config


def jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def stopped_then_resumed(tmp_path, monkeypatch, report_to: list[str]) -> Path:
    """The manual case of test_resume stopped before step 4 (checkpoint at 2, steps 1-3 logged), then resumed."""
    cfg = config(tmp_path, "manual", train={**config(tmp_path, "manual").train.__dict__, "report_to": report_to})
    with monkeypatch.context() as patch:
        stop_at(patch, None, 3)
        with pytest.raises(Stop):
            run_experiment(cfg)
    run_dir = run_dir_for(cfg)
    assert [r["step"] for r in jsonl(run_dir)] == [1, 2, 3]
    assert run_experiment(cfg)["status"] == "completed"
    assert [r["step"] for r in jsonl(run_dir)] == list(range(1, 8))
    return run_dir


# -- config ------------------------------------------------------------------------------------------------------------
def test_report_to_is_checked_and_not_in_the_run_id(tmp_path):
    base = tiny_config(tmp_path)
    tracked = tiny_config(tmp_path, train={**base.train.__dict__, "report_to": ["jsonl", "tensorboard", "wandb"]})
    assert run_id_of(tracked) == run_id_of(base)  # an execution setting: the same experiment
    with pytest.raises(ConfigError, match=r"train.report_to\[1\]: 'tensorbord' is not one of.*tensorboard"):
        tiny_config(tmp_path, train={**base.train.__dict__, "report_to": ["jsonl", "tensorbord"]})
    with pytest.raises(ConfigError, match="train.report_to: a tracker is listed twice"):
        tiny_config(tmp_path, train={**base.train.__dict__, "report_to": ["wandb", "wandb"]})


def test_a_tracker_whose_package_is_missing_is_refused_before_the_run_starts(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, train={**tiny_config(tmp_path).train.__dict__, "report_to": ["tensorboard", "wandb"]})
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError) as raised:
        run_experiment(cfg)
    assert str(raised.value) == 'train.report_to: wandb needs the wandb package: pip install "clip-compress[track]"'
    assert not run_dir_for(cfg).exists()  # nothing loaded, nothing written


# -- TensorBoard ------------------------------------------------------------------------------------------------------
def tensorboard_series(log_dir: Path, purge: bool = True) -> dict[str, list[tuple[int, float]]]:
    """Every scalar as TensorBoard's server reads it (its plugin event accumulator: restarts purged)."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    events = EventAccumulator(str(log_dir), purge_orphaned_data=purge)
    events.Reload()
    return {tag: [(e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in events.Tensors(tag)]
            for tag in events.Tags()["tensors"]}


def jsonl_series(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    keys = {k for r in records for k, v in r.items() if k != "step" and isinstance(v, int | float)}
    return {k: [(r["step"], float(r[k])) for r in records if k in r] for k in keys}


def test_tensorboard_reads_back_metrics_jsonl_also_across_a_resume(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard", reason="the track extra is not installed")
    run_dir = stopped_then_resumed(tmp_path, monkeypatch, ["tensorboard"])
    series = tensorboard_series(run_dir / "tensorboard")
    assert series == jsonl_series(jsonl(run_dir))  # every key, every step once, the same values (float64)
    assert {"loss", "lr", "time/teacher_s", "time/samples_per_s_per_device"} <= series.keys()
    # the files do hold the first attempt's step 3: without the purge it would be there twice
    assert [s for s, _ in tensorboard_series(run_dir / "tensorboard", purge=False)["loss"]].count(3) == 2


def test_a_fresh_start_leaves_no_earlier_events(tmp_path):
    pytest.importorskip("tensorboard", reason="the track extra is not installed")
    cfg = tiny_config(tmp_path, train={**tiny_config(tmp_path).train.__dict__, "report_to": ["tensorboard"]},
                      output={"dir": str(tmp_path / "runs"), "save_checkpoint": False})
    for _ in range(2):  # no checkpoint: the second attempt starts at step 0 again
        assert run_experiment(cfg)["status"] == "completed"
    run_dir = run_dir_for(cfg)
    assert tensorboard_series(run_dir / "tensorboard", purge=False) == jsonl_series(jsonl(run_dir))


@pytest.mark.slow
def test_each_stage_of_a_staged_run_has_its_own_tensorboard_run(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard", reason="the track extra is not installed")
    cfg = config(tmp_path, "two-stages", train={**config(tmp_path, "two-stages").train.__dict__,
                                                  "report_to": ["tensorboard"]})
    assert run_experiment(cfg)["status"] == "completed"
    stages = sorted((run_dir_for(cfg) / "stages").iterdir())
    assert len(stages) == 2 and not (run_dir_for(cfg) / "tensorboard").exists()
    for stage in stages:  # steps restart at each stage: one TensorBoard run per stage folder
        assert tensorboard_series(stage / "tensorboard") == jsonl_series(jsonl(stage))


# -- Weights & Biases -----------------------------------------------------------------------------------------------
def wandb_history(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """The run ids and the history rows of a W&B transaction log (``run-ID.wandb``: leveldb-log blocks of
    protobuf ``Record``s; wandb's own Python reader is gone since the Go core)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunks, records = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    ids = [r.run.run_id for r in records if r.WhichOneof("record_type") == "run"]
    rows = [(r.history.step.num, {key: json.loads(i.value_json) for i in r.history.item
                                  if not (key := i.key or "/".join(i.nested_key)).startswith("_")})
            for r in records if r.WhichOneof("record_type") == "history"]
    return ids, rows


@pytest.mark.slow
def test_wandb_offline_writes_its_run_folder_and_resumes_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the track extra is not installed")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline by default
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))  # the run's folder wins: dir= is passed
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no settings or credentials of the machine
    run_dir = stopped_then_resumed(tmp_path, monkeypatch, ["wandb"])
    run_id = run_dir.name.rsplit("-", 1)[1]
    logs = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(logs) == 2  # two attempts, one W&B run id
    rows = []
    for log in logs:
        ids, history = wandb_history(log)
        assert ids == [run_id]
        rows += history
    # the resumed attempt sends every step after its checkpoint (2): step 3 again (W&B keeps the first it stored)
    assert [step for step, _ in rows] == [1, 2, 3, 3, 4, 5, 6, 7]
    records = {r["step"]: r for r in jsonl(run_dir)}
    for step, row in rows:
        expected = {k: v for k, v in records[step].items() if k != "step" and not k.startswith("time/")
                    and k != "samples_per_s"}
        assert {k: row[k] for k in expected} == expected  # both attempts' step 3: the same values (exact resume)


def test_trackers_are_all_closed_and_told_whether_the_stage_failed():
    from compress.tracking import Trackers

    class Fake:
        def __init__(self, fails: bool) -> None:
            self.fails, self.closed, self.logged = fails, None, []

        def log(self, record):
            self.logged.append(record["step"])

        def summary(self, metrics):
            pass

        def close(self, ok):
            self.closed = ok
            if self.fails:
                raise OSError("disk full")

    broken, fine = Fake(fails=True), Fake(fails=False)
    with pytest.raises(RuntimeError, match="training failed"):  # the stage's error, not the tracker's
        with Trackers([broken, fine]) as trackers:
            trackers.log({"step": 1, "loss": 2.0})
            raise RuntimeError("training failed")
    assert broken.logged == fine.logged == [1]
    assert broken.closed is False and fine.closed is False  # both closed, both told the stage did not complete
    broken, fine = Fake(fails=True), Fake(fails=False)
    with pytest.raises(OSError, match="disk full"):  # a completed stage: the close's error is the error
        with Trackers([broken, fine]):
            pass
    assert broken.closed is True and fine.closed is True


def test_the_track_extra_is_declared_and_dev_carries_it() -> None:
    import tomllib

    extras = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert {d.split(">")[0] for d in extras["track"]} == {"tensorboard", "wandb"}
    assert "clip-compress[track]" in extras["dev"]


# -- W&B ids and steps, with a stand-in for the wandb package ------------------------------------------------------
class FakeWandb(types.ModuleType):
    """Records every ``wandb.init``'s keyword arguments and the steps each run is sent."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.inits: list[dict] = []
        self.steps: list[list[int]] = []

    def Settings(self, **kwargs):  # noqa: N802 (wandb's name)
        return kwargs

    def init(self, **kwargs):
        self.inits.append(kwargs)
        steps: list[int] = []
        self.steps.append(steps)
        return types.SimpleNamespace(log=lambda data, step: steps.append(step), summary={},
                                     finish=lambda exit_code: None)


@pytest.fixture
def fake_wandb(monkeypatch) -> FakeWandb:
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr("compress.tracking.base.importlib.util.find_spec",
                        lambda name, *a: object() if name == "wandb" else importlib.util.find_spec(name, *a))
    return fake


def test_each_start_from_step_0_is_a_wandb_run_of_its_own_and_a_resume_reopens_it(tmp_path, monkeypatch, fake_wandb):
    run_dir = stopped_then_resumed(tmp_path, monkeypatch, ["wandb"])
    run_id = run_dir.name.rsplit("-", 1)[1]
    unsynced = run_dir / "wandb" / "offline-run-20260101_000000-x" / "run-x.wandb"
    unsynced.parent.mkdir(parents=True)
    unsynced.write_bytes(b":W&B")  # a run not synced yet: no start from step 0 may delete it
    cfg = config(tmp_path, "manual", train={**config(tmp_path, "manual").train.__dict__, "report_to": ["wandb"]})
    assert run_experiment(cfg, force=True)["status"] == "completed"
    with monkeypatch.context() as patch:  # stopped before its first checkpoint: the next attempt starts at 0
        stop_at(patch, None, 1)
        with pytest.raises(Stop):
            run_experiment(cfg, force=True)
    assert run_experiment(cfg)["status"] == "completed"
    assert [i["id"] for i in fake_wandb.inits] == [run_id, run_id, f"{run_id}-r2", f"{run_id}-r3", f"{run_id}-r4"]
    assert {i["group"] for i in fake_wandb.inits} == {run_id} and {i["resume"] for i in fake_wandb.inits} == {"allow"}
    # the resumed attempt sends every step after its checkpoint (2), step 3 again: W&B keeps the one it holds
    assert fake_wandb.steps == [[1, 2, 3], [3, 4, 5, 6, 7], list(range(1, 8)), [1], list(range(1, 8))]
    assert unsynced.read_bytes() == b":W&B"
    assert json.loads((run_dir / "wandb" / "clip_compress_ids.json").read_text()) == {
        run_id: {"id": f"{run_id}-r4", "attempt": 4}}


def test_a_stage_writes_its_wandb_run_into_the_run_folder_under_its_own_id(tmp_path, fake_wandb):
    from compress.tracking import open_trackers

    stage = tmp_path / "run" / "stages" / "1-second"
    (stage / "tensorboard").mkdir(parents=True)
    for resumed_at in (None, 4, None):
        open_trackers(["wandb"], stage, run_dir=tmp_path / "run", run_id="abc-1-second", name="n-1-second",
                      config={}, resumed_at=resumed_at, group="abc")
    assert [(i["id"], i["name"], i["dir"]) for i in fake_wandb.inits] == [
        ("abc-1-second", "n-1-second", str(tmp_path / "run")), ("abc-1-second", "n-1-second", str(tmp_path / "run")),
        ("abc-1-second-r2", "n-1-second-r2", str(tmp_path / "run"))]
    assert not (stage / "tensorboard").exists() and not (stage / "wandb").exists()
