"""A run trained from an fp32 teacher-output cache trains as the same run with the teacher online on the same views
(``teacher_cache.mode: online``): after a resume too, the teacher never reaches the device, and a sweep whose runs
share a cache generates it once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compress.recipe import config_from_dict
from compress.run import run_dir_for, run_experiment
from compress.teacher_cache.generate import generate
from tests.test_resume import Stop, stop_at

#: 16 samples, batch 8, 6 steps: 3 epochs, so every sample is trained on both of its views
BASE = {
    "name": "cached",
    "teacher": {"model": "cc-test-rn-teacher", "random_init": True},  # 64 px: its view is not the student's
    "student": {"model": "cc-test-student"},
    "inheritance": {"name": "none"},
    "losses": [{"name": "affinity"}],
    "schedules": {"lr": {"name": "warmup_cosine", "warmup_steps": 1}},
    "data": {"train": {"kind": "synthetic", "num_samples": 16}},
    "train": {"steps": 6, "batch_size": 8, "lr": 1e-3, "eps": 1e-4, "log_every": 1, "progress": False,
              "checkpoint_every": 2},
    "eval": {"zero_shot": [], "retrieval": False, "macs": False, "throughput": False},
}
TOL = 1e-6
#: LOSS_TOL: the cache's teacher outputs come from other batches than the online teacher's (a shard's samples with all
#: their views; the last shard of 16 samples in 5s holds one), which changes the float reassociation of small batches
#: (~1e-7 per feature): the losses, sums over the batch of terms ~4 in size, agree to a relative 1e-6, not an absolute


def config(tmp_path: Path, mode: str, out: str, **extra):
    cache = {"mode": mode, "dtype": "fp32", "num_augmentations": 2, "shard_size": 5, "dir": str(tmp_path / "cache")}
    return config_from_dict({**BASE, "teacher_cache": cache, "output": {"dir": str(tmp_path / out)}, **extra})


def weights(cfg) -> dict[str, torch.Tensor]:
    row = json.loads((run_dir_for(cfg) / "result.json").read_text())
    assert row["status"] == "completed", row.get("error")
    return load_file(str(next(Path(row["metrics"]["export/path"]).glob("*.safetensors"))))


def losses(cfg) -> list[float]:
    lines = (run_dir_for(cfg) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert float((value - b[key]).abs().max()) <= TOL, key


@pytest.mark.parametrize("accum", [1, 2])
def test_a_run_from_an_fp32_cache_trains_as_the_online_teacher_on_the_same_views(tmp_path, monkeypatch, accum):
    """With accumulation the live pass reads each micro-batch again from a second loader that makes the student's
    view alone (no teacher view, no cached output): it finds the same images (no resync)."""
    train = {**BASE["train"], "accum_steps": accum}
    online = config(tmp_path, "online", "online", train=train)
    assert run_experiment(online)["status"] == "completed"
    cached = config(tmp_path, "cache", "cached", train=train)
    generate(cached, progress=False)  # first: the generator runs the teacher (through OnlineTeacher)
    with monkeypatch.context() as patch:  # the teacher never runs in the cached run's training
        patch.setattr("compress.teacher.OnlineTeacher.__call__",
                      lambda *a: (_ for _ in ()).throw(AssertionError("the teacher ran")))
        assert run_experiment(cached)["status"] == "completed"
    assert_close(weights(cached), weights(online))
    # the weights within 1e-6 (above); the logged losses within 1e-5 relative: the cached features come from other
    # batch compositions (float reassociation, ~1e-7), which the loss's sums over 8 x 8 similarities carry
    assert losses(cached) == pytest.approx(losses(online), rel=10 * TOL)
    if accum > 1:
        row = json.loads((run_dir_for(cached) / "result.json").read_text())["metrics"]
        assert row["data/replay_resyncs"] == 0 and row["data/replay_by_key_steps"] == 0


@pytest.mark.slow
def test_a_cached_run_stopped_and_resumed_trains_as_the_online_run(tmp_path, monkeypatch):
    online = config(tmp_path, "online", "online")
    assert run_experiment(online)["status"] == "completed"
    cached = config(tmp_path, "cache", "cached")
    with monkeypatch.context() as patch:
        stop_at(patch, None, 3)
        with pytest.raises(Stop):
            run_experiment(cached)
    from compress.checkpoint import latest_checkpoint
    from compress.teacher_cache.identity import cache_id_of

    assert latest_checkpoint(run_dir_for(cached)).meta["teacher_cache_id"] == cache_id_of(cached)
    assert run_experiment(cached)["status"] == "completed"
    assert_close(weights(cached), weights(online))
    assert losses(cached) == pytest.approx(losses(online), rel=TOL, abs=TOL)


def test_the_cached_teacher_is_never_moved_to_the_device(tmp_path, monkeypatch):
    assert run_experiment(config(tmp_path, "cache", "first"))["status"] == "completed"  # generates the cache
    calls = []
    monkeypatch.setattr("compress.teacher.compute_copy", lambda *a: calls.append(a) or a[0])
    assert run_experiment(config(tmp_path, "cache", "cached"))["status"] == "completed"
    assert not calls
    assert run_experiment(config(tmp_path, "online", "online"))["status"] == "completed"
    assert calls  # the online run does build its compute copy


def test_a_sweep_of_three_runs_sharing_a_cache_generates_it_once(tmp_path, monkeypatch, capsys):
    """Three learning rates over one cache (the cache's identity has no lr): every shard is written once, by the
    first run; the other two read it (and the three rows name the same cache)."""
    import yaml

    from compress.teacher_cache import generate as generate_module
    from experiments.cli import main

    written: list[int] = []
    original = generate_module._ShardGenerator.write_shard

    def counting(self, shard):
        written.append(shard)
        return original(self, shard)

    monkeypatch.setattr(generate_module._ShardGenerator, "write_shard", counting)
    base = {**BASE, "teacher_cache": {"dtype": "fp16", "num_augmentations": 2, "shard_size": 5,
                                      "dir": str(tmp_path / "cache")}, "train": {**BASE["train"], "steps": 2}}
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = {"name": "lrs", "base": "base.yaml", "output_dir": str(tmp_path / "runs"),
             "axes": {"train.lr": [1e-3, 3e-4, 1e-4]}}
    (folder / "lrs.yaml").write_text(yaml.safe_dump(sweep))
    assert main(["sweep", str(folder / "lrs.yaml"), "--backend", "inline"]) == 0
    assert sorted(written) == [0, 1, 2, 3]  # 16 samples in shards of 5, each once
    rows = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/result.json")]
    assert len(rows) == 3 and all(r["status"] == "completed" for r in rows)
    assert len({r["metrics"]["teacher/cache_id"] for r in rows}) == 1
    assert len(list((tmp_path / "cache").iterdir())) == 1
