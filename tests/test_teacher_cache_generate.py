"""Generating a teacher cache: the stored boxes and outputs are the online teacher's on those views, parts and
kills give the same cache, finished shards are never redone, a held shard is skipped or waited for, bad samples
are marked, verify measures the stored dtype's error, and the command line (here, inline, SLURM, local)."""

from __future__ import annotations

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from compress.data.datasets import build_dataset
from compress.data.robust import torch_seeded
from compress.data.transforms import CropViews, preprocess_of
from compress.data.views import view_seed
from compress.models.forward import tokenizer_for
from compress.plan.cache import _written
from compress.precision import resolve_precision
from compress.recipe import config_from_dict
from compress.teacher import OnlineTeacher, load_teachers
from compress.teacher_cache import generate as generate_module
from compress.teacher_cache import locking
from compress.teacher_cache.generate import CacheConfigError, generate, verify
from compress.teacher_cache.identity import cache_root, estimated_bytes
from compress.teacher_cache.locking import STALE_S, ShardLock
from compress.teacher_cache.store import COMPLETE, MANIFEST, CacheStore, ShardWriter, lock_name, shard_name
from compress.teacher_cache.teachers import Teachers
from experiments.cli import main
from tests.test_dispatch_backends import fake_slurm, sbatch_flags  # noqa: F401 - the fixture

ROOT = Path(__file__).resolve().parents[1]
N, A, SHARD = 10, 2, 4  # 3 shards: 4, 4, 2 samples
OUTPUTS = ["image_features", "text_features", "image_embeds", "text_embeds"]


def config_dict(tmp_path: Path, **cache) -> dict:
    return {
        "name": "cache", "teacher": {"model": "cc-test-teacher", "random_init": True},
        "student": {"model": "cc-test-student"}, "inheritance": {"name": "manual"},
        "data": {"train": {"kind": "synthetic", "num_samples": N}, "val": {"kind": "synthetic", "num_samples": 8}},
        "train": {"steps": 2, "batch_size": 4, "progress": False},
        "eval": {"zero_shot": [], "throughput": False},
        "output": {"dir": str(tmp_path / "runs")},
        "teacher_cache": {"dir": str(tmp_path / "cache"), "num_augmentations": A, "shard_size": SHARD,
                          "dtype": "fp32", "outputs": OUTPUTS, **cache},
    }


def cache_cfg(tmp_path: Path, **cache):
    return config_from_dict(config_dict(tmp_path, **cache))


def files_of(root: Path) -> dict[str, bytes]:
    """Every shard file's bytes (meta.json holds timings: left out)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("shard-*/*.npy"))}


def test_stored_boxes_and_outputs_are_the_online_teachers_on_the_replayed_views(tmp_path):
    cfg = cache_cfg(tmp_path)
    report = generate(cfg, progress=False)
    assert report.complete and report.computed == [0, 1, 2] and report.bad_samples == 0
    store = CacheStore(report.root)
    teacher = load_teachers(cfg)[0]
    crop = CropViews({"t": preprocess_of(teacher)})
    online = OnlineTeacher(teacher, resolve_precision("fp32", "cpu"), ["image_embeds", "text_embeds"])
    dataset = build_dataset(cfg.data.train, transform=None)
    ids = torch.arange(N).repeat_interleave(A)
    augs = torch.arange(A).repeat(N)
    boxes, views, captions = [], [], []
    for i, v in zip(ids.tolist(), augs.tolist(), strict=True):
        img, caption = dataset[i]
        with torch_seeded(view_seed(cfg.teacher_cache.seed, i, v)):
            boxes.append(crop.draw(img))
        views.append(crop.apply(img, boxes[-1])["t"])
        captions.append(caption)
    assert store.boxes(ids, augs).tolist() == [list(b) for b in boxes]
    assert len(set(boxes)) > N  # the views differ
    out = online({"images": torch.stack(views), "texts": tokenizer_for(teacher)(captions)})
    for name in OUTPUTS:
        torch.testing.assert_close(store.outputs(name, 0, ids, augs), getattr(out, name), atol=1e-6, rtol=0)
    manifest = store.manifest
    assert manifest["teachers"][0]["logit_scale"] == pytest.approx(float(teacher.logit_scale.exp()))
    assert manifest["num_shards"] == 3 and manifest["precision"] == "fp32" and manifest["summary"]["samples"] == N
    # the size estimate of the dry run: the files less their headers (128 bytes per .npy) and meta.json
    estimate = estimated_bytes(N, [32], [32], A, "fp32", OUTPUTS)
    assert estimate <= report.bytes <= estimate + 3 * (6 * 128 + 200)


def test_two_parts_in_two_calls_write_the_cache_one_call_writes(tmp_path):
    one = generate(cache_cfg(tmp_path / "one"), progress=False)
    cfg = cache_cfg(tmp_path / "two")
    first = generate(cfg, part=0, parts=2, wait=False, progress=False)
    assert first.computed == [0, 2] and first.missing == [1] and not first.complete
    second = generate(cfg, part=1, parts=2, wait=False, progress=False)
    assert second.computed == [1] and second.complete
    assert second.root.name == one.root.name  # the cache id does not depend on the folder
    assert files_of(second.root) == files_of(one.root)  # bit for bit (fp32, the same batches)
    assert generate(cfg, progress=False).computed == []  # complete: nothing is redone


def test_an_interrupted_generation_resumes_without_redoing_finished_shards(tmp_path, monkeypatch):
    """A writer that dies after writing its second shard's files, before the rename (as a kill would leave it):
    the next call discards that folder, computes only the missing shards, and the cache equals a fresh one."""
    cfg = cache_cfg(tmp_path)
    commit, calls = ShardWriter.commit, []

    def dying(self):
        calls.append(self.shard)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return commit(self)

    monkeypatch.setattr(ShardWriter, "commit", dying)
    with pytest.raises(KeyboardInterrupt):
        generate(cfg, progress=False)
    monkeypatch.setattr(ShardWriter, "commit", commit)
    root = cache_root(cfg)
    assert (root / "shard-000000").is_dir() and not (root / "shard-000001").exists()
    assert list(root.glob(".shard-000001.tmp-*"))  # the dead writer's folder
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (root / "shard-000000").iterdir()}
    report = generate(cfg, progress=False)
    assert report.computed == [1, 2] and report.complete
    assert not list(root.glob(".shard-*")) and not list(root.glob("*.lock"))
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (root / "shard-000000").iterdir()} == before
    assert files_of(root) == files_of(generate(cache_cfg(tmp_path / "fresh"), progress=False).root)


KILLER = """
import json, os, signal, sys
from compress.recipe import config_from_dict
from compress.teacher_cache import store
commit, count = store.ShardWriter.commit, []
def dying(self):
    count.append(self.shard)
    if len(count) == 2:  # the second shard's files are written, the folder not renamed yet
        os.kill(os.getpid(), signal.SIGKILL)
    return commit(self)
store.ShardWriter.commit = dying
from compress.teacher_cache.generate import generate
generate(config_from_dict(json.loads(sys.argv[1])), progress=False)
"""


@pytest.mark.slow
def test_a_generator_killed_with_sigkill_while_writing_is_resumed_by_the_next(tmp_path):
    data = config_dict(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", KILLER, json.dumps(data)], cwd=ROOT, env=env, capture_output=True,
                          timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    cfg = config_from_dict(data)
    root = cache_root(cfg)
    assert (root / "shard-000000").is_dir() and list(root.glob(".shard-000001.tmp-*"))
    assert (root / lock_name(1)).exists()  # the kernel released its lock; the file stays
    report = generate(cfg, progress=False)
    assert report.computed == [1, 2] and report.complete and not list(root.glob(".shard-*"))
    assert files_of(root) == files_of(generate(cache_cfg(tmp_path / "fresh"), progress=False).root)


def test_a_held_shard_is_skipped_without_wait_and_waited_for_with_it(tmp_path):
    cfg = cache_cfg(tmp_path)
    root = cache_root(cfg)
    root.mkdir(parents=True)
    finished: list = []
    with ShardLock(root / lock_name(1), blocking=False) as held:  # another generator is writing shard 1
        assert held
        report = generate(cfg, wait=False, progress=False)
        assert report.computed == [0, 2] and report.skipped == [1] and report.missing == [1]
        waiter = threading.Thread(target=lambda: finished.append(generate(cfg, wait=True, progress=False)))
        waiter.start()
        time.sleep(1.5)
        assert waiter.is_alive() and not (root / shard_name(1)).exists()  # blocked on the lock
    waiter.join(timeout=120)  # the holder went away without writing it: the waiter takes it over
    assert finished and finished[0].computed == [1] and finished[0].complete


def test_verify_reports_nothing_for_fp32_and_the_rounding_of_fp16(tmp_path):
    cfg = cache_cfg(tmp_path)
    generate(cfg, progress=False)
    exact = verify(cfg, 6, seed=1)
    assert len(exact.pairs) == 6 and exact.box_mismatches == 0 and exact.passed
    assert all(v <= 1e-5 for values in exact.max_abs.values() for v in values)
    half = cache_cfg(tmp_path, dtype="fp16")
    generate(half, progress=False)
    rounded = verify(half, 6, seed=1)
    worst = max(v for values in rounded.max_abs.values() for v in values)
    assert 0 < worst <= 2e-3 and rounded.passed


def write_csv(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rows = ["filepath,title"]
    for i in range(5):
        if i != 2:  # row 2 names an image that is not there
            Image.fromarray(np.full((40, 48, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append(f"images/{i}.png,a picture number {i}")
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "train.csv"


def test_a_bad_sample_is_stored_not_ok_with_zero_rows_and_counted(tmp_path):
    data = config_dict(tmp_path)
    data["data"]["train"] = {"kind": "csv", "path": str(write_csv(tmp_path))}
    cfg = config_from_dict(data)
    report = generate(cfg, progress=False)
    assert report.complete and report.bad_samples == 1
    store = CacheStore(report.root)
    assert store.ok(range(5)).tolist() == [True, True, False, True, True]
    assert store.outputs("image_features", 0, [2, 2], [0, 1]).abs().sum() == 0
    assert store.outputs("text_features", 0, [2], None).abs().sum() == 0 and store.boxes([2], [1]).abs().sum() == 0
    assert store.outputs("image_features", 0, [3], [0]).norm() == pytest.approx(1.0)
    assert store.shard_meta(0)["bad"] == 1 and store.manifest["summary"]["bad_samples"] == 1
    assert verify(cfg, 3).passed


def test_two_teachers_with_their_own_views_are_stored_side_by_side(tmp_path):
    data = config_dict(tmp_path)
    data["teachers"] = [{"model": "cc-test-teacher", "random_init": True},
                        {"model": "cc-test-rn-teacher", "random_init": True}]  # 32 px and 64 px
    cfg = config_from_dict(data)
    report = generate(cfg, progress=False)
    store = CacheStore(report.root)
    assert [t["model"] for t in store.manifest["teachers"]] == ["cc-test-teacher", "cc-test-rn-teacher"]
    assert store.outputs("image_features", 1, [0], [1]).shape == (1, store.manifest["teachers"][1]["image_dim"])
    assert (report.root / "shard-000000" / "image_embeds-1.npy").is_file()
    check = verify(cfg, 4)
    assert check.passed and all(len(v) == 2 for v in check.max_abs.values())


def test_webdataset_and_a_config_without_the_section_are_refused(tmp_path):
    import dataclasses

    from compress.config import ConfigError

    data = config_dict(tmp_path)
    data["data"]["train"] = {"kind": "webdataset", "path": str(tmp_path / "shards-{0..1}.tar")}
    with pytest.raises(ConfigError, match="webdataset"):  # refused when the config is read
        config_from_dict(data)
    cfg = cache_cfg(tmp_path)
    cfg.data.train = dataclasses.replace(cfg.data.train, kind="webdataset")  # and by the generator itself
    with pytest.raises(CacheConfigError, match="webdataset is not supported"):
        generate(cfg)
    data = config_dict(tmp_path)
    del data["teacher_cache"]
    with pytest.raises(CacheConfigError, match="no teacher_cache section"):
        generate(config_from_dict(data))


def test_progress_is_a_few_lines_on_stderr(tmp_path, capsys):
    generate(cache_cfg(tmp_path), progress=True)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("[cache-teacher]")]
    assert 1 <= len(lines) <= 2 and "samples_per_s" in lines[-1] and f"{N}/{N}" in lines[-1]


# -- the command line -----------------------------------------------------------------------------------
def write_config(tmp_path: Path, data: dict | None = None) -> Path:
    path = tmp_path / "cache.yaml"
    path.write_text(yaml.safe_dump(data or config_dict(tmp_path)))
    return path


def test_the_command_generates_prints_and_verifies(tmp_path, capsys):
    path = write_config(tmp_path)
    assert main(["cache-teacher", str(path), "--set", "teacher_cache.dtype=fp16", "--batch-size", "3"]) == 0
    out = capsys.readouterr().out
    cfg = cache_cfg(tmp_path, dtype="fp16")
    assert str(cache_root(cfg)) in out and f"samples {N}, bad samples 0" in out and "MiB" in out
    assert main(["cache-teacher", str(path), "--set", "teacher_cache.dtype=fp16", "--verify", "5"]) == 0
    out = capsys.readouterr().out
    assert "image_features teacher 0" in out and "tolerance 0.002 for fp16" in out and "passed" in out
    # a stored row off by more than the tolerance fails the check
    stored = np.load(cache_root(cfg) / "shard-000000" / "text_features-0.npy", mmap_mode="r+")
    stored[:] += np.float16(0.01)
    stored.flush()
    assert main(["cache-teacher", str(path), "--set", "teacher_cache.dtype=fp16", "--verify", "10"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_the_command_refuses_a_config_without_the_section_in_one_line(tmp_path, capsys):
    data = config_dict(tmp_path)
    del data["teacher_cache"]
    assert main(["cache-teacher", str(write_config(tmp_path, data))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no teacher_cache section: add one" in err[0]


def test_dispatch_inline_runs_the_parts_here(tmp_path, capsys):
    path = write_config(tmp_path)
    assert main(["cache-teacher", str(path), "--dispatch", "--parts", "2"]) == 0
    assert CacheStore(cache_root(cache_cfg(tmp_path))).complete()
    assert "(complete)" in capsys.readouterr().out


def test_dispatch_slurm_submits_one_array_of_part_jobs(tmp_path, fake_slurm, capsys):  # noqa: F811
    from submitit.core.utils import DelayedSubmission

    from experiments.cache_job import CacheJob

    path = write_config(tmp_path)
    args = ["cache-teacher", str(path), "--dispatch", "--parts", "3", "--set", "dispatch.backend=slurm",
            "--set", "dispatch.gpus_per_node=8", "--set", "dispatch.partition=gpu"]
    assert main(args) == 0
    assert "[submitted] 3 cache part job(s)" in capsys.readouterr().out
    flags = sbatch_flags((fake_slurm / "script-1001.sh").read_text())
    assert flags["array"].startswith("0-2") and flags["gpus-per-node"] == "1" and flags["ntasks-per-node"] == "1"
    assert flags["partition"] == "gpu" and flags["job-name"] == "cache-cache"
    assert not (fake_slurm / "script-1002.sh").exists()
    folder = tmp_path / "cache" / "submitit"
    jobs = [DelayedSubmission.load(next(folder.glob(f"1001_{i}_submitted.pkl"))).function for i in range(3)]
    assert all(isinstance(j, CacheJob) for j in jobs) and [j.part for j in jobs] == [0, 1, 2]
    assert {j.parts for j in jobs} == {3} and pickle.loads(pickle.dumps(jobs[1])).config == jobs[1].config
    resubmitted = jobs[2].checkpoint().function
    assert (resubmitted.part, resubmitted.parts, resubmitted.config) == (2, 3, jobs[2].config)


@pytest.mark.slow
def test_dispatch_local_runs_part_jobs_in_processes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the jobs import this checkout
    path = write_config(tmp_path)
    args = ["cache-teacher", str(path), "--dispatch", "--parts", "2", "--set", "dispatch.backend=local",
            "--set", "dispatch.max_parallel=2"]
    assert main(args) == 0
    assert "[submitted] 2 cache part job(s) with the local backend" in capsys.readouterr().out
    store = CacheStore(cache_root(cache_cfg(tmp_path)))
    deadline = time.time() + 240
    while not ((store.root / MANIFEST).is_file() and store.complete()) and time.time() < deadline:
        time.sleep(0.5)
    logs = [p.read_text()[-2000:] for p in (tmp_path / "cache" / "submitit").rglob("*.err")]
    assert store.complete(), logs


def test_dataloader_workers_write_the_same_cache(tmp_path):
    serial = generate(cache_cfg(tmp_path / "serial"), progress=False, batch_size=3)
    data = config_dict(tmp_path / "workers")
    data["data"]["num_workers"] = 2
    parallel = generate(config_from_dict(data), progress=False, batch_size=3)
    assert parallel.root.name == serial.root.name and files_of(parallel.root) == files_of(serial.root)


def test_half_precision_teachers_store_their_autocast_outputs_and_a_mixed_precision_cache_is_refused(
        tmp_path, monkeypatch):
    """The teachers under bf16 autocast (CPU autocast: the casting logic of CUDA) store exactly what the online
    teacher returns under it, rounded to bf16; a generator whose precision resolves otherwise is refused."""
    from compress import precision as precision_module
    from compress.precision import Precision

    bf16 = Precision("bf16", torch.device("cpu"))
    monkeypatch.setattr(precision_module, "resolve_precision", lambda name, device: bf16)
    cfg = cache_cfg(tmp_path, dtype="bf16", outputs=["image_features", "text_features"])
    report = generate(cfg, part=0, parts=3, wait=False, progress=False)
    store = CacheStore(report.root)
    assert store.manifest["precision"] == "bf16"
    teacher = load_teachers(cfg)[0]
    dataset = build_dataset(cfg.data.train, transform=None)
    crop = CropViews({"t": preprocess_of(teacher)})
    img, caption = dataset[1]
    views = torch.stack([crop.apply(img, tuple(store.boxes([1], [v])[0].tolist()))["t"] for v in range(A)])
    out = OnlineTeacher(teacher, bf16)({"images": views, "texts": tokenizer_for(teacher)([caption])})
    stored = store.outputs("image_features", 0, [1, 1], [0, 1])
    torch.testing.assert_close(stored, out.image_features.to(torch.bfloat16).float(), atol=8e-3, rtol=0)
    assert verify(cfg, 4).passed
    monkeypatch.undo()  # fp32 here now: the rest of this cache would be computed otherwise
    with pytest.raises(CacheConfigError, match="generated with the teachers in bf16.*set train.precision: bf16"):
        generate(cfg, progress=False)


# -- the manifest's cut, images per batch, no flock, two generators at once ------------------------------
def test_a_cache_begun_in_shards_of_4_is_finished_in_them_whatever_the_configs_shard_size(tmp_path, capsys):
    cfg4 = cache_cfg(tmp_path)
    assert generate(cfg4, part=0, parts=2, wait=False, progress=False).computed == [0, 2]
    cfg3 = cache_cfg(tmp_path, shard_size=3)
    assert cache_root(cfg3) == cache_root(cfg4)  # shard_size is no part of the cache id
    assert _written(cache_root(cfg3))[0].startswith("2 of 3 shards written")  # the plan counts the manifest's
    report = generate(cfg3, progress=False)
    assert _written(report.root)[0].startswith("complete: 10 samples in 3 shards")
    assert "cut in shards of 4 samples" in capsys.readouterr().err
    assert report.complete and report.computed == [1] and report.num_shards == 3
    assert (report.root / COMPLETE).is_file()
    assert files_of(report.root) == files_of(generate(cache_cfg(tmp_path / "fresh"), progress=False).root)
    assert CacheStore(report.root).ok(range(N)).all()


def test_the_batch_size_counts_images_not_samples(tmp_path, monkeypatch, capsys):
    seen: list[tuple[int, int]] = []
    forward = Teachers.forward

    def spy(self, k, images, captions):
        seen.append((images.shape[0], len(captions)))
        return forward(self, k, images, captions)

    monkeypatch.setattr(Teachers, "forward", spy)
    generate(cache_cfg(tmp_path), progress=False, batch_size=5)  # A = 2: 2 samples (4 images) a forward
    assert seen[0] == (4, 2) and max(images for images, _ in seen) <= 5
    seen.clear()
    generate(cache_cfg(tmp_path / "one"), progress=False, batch_size=1)  # at least one sample
    assert seen[0] == (A, 1)


def test_without_flock_a_live_writers_shard_is_skipped_or_waited_for_and_a_stale_one_taken_over(
        tmp_path, monkeypatch, capsys):
    def no_flock(fd, flags):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(locking.fcntl, "flock", no_flock)
    monkeypatch.setattr(generate_module, "POLL_S", 0.05)
    cfg = cache_cfg(tmp_path)
    root = cache_root(cfg)
    root.mkdir(parents=True)
    other = ShardWriter(root, 1)  # another generator's live writer of shard 1 (its folder is new)
    report = generate(cfg, wait=False, progress=False)
    assert report.computed == [0, 2] and report.missing == [1] and other.tmp.is_dir()  # not discarded
    finished: list = []
    waiter = threading.Thread(target=lambda: finished.append(generate(cfg, wait=True, progress=False)))
    waiter.start()
    time.sleep(1.0)
    assert waiter.is_alive() and not (root / shard_name(1)).exists() and other.tmp.is_dir()  # polling
    other.abort()  # the other writer went away without committing: the waiter takes the shard over
    waiter.join(timeout=120)
    assert finished and finished[0].computed == [1] and finished[0].complete
    assert "waiting for shard 1" in capsys.readouterr().err
    stale_cfg = cache_cfg(tmp_path / "stale")
    stale_root = cache_root(stale_cfg)
    stale_root.mkdir(parents=True)
    dead = ShardWriter(stale_root, 1)  # a killed writer's folder, untouched for two hours
    os.utime(dead.tmp, (time.time() - 2 * STALE_S,) * 2)
    assert generate(stale_cfg, wait=False, progress=False).computed == [0, 1, 2] and not dead.tmp.exists()
    assert files_of(stale_root) == files_of(root)


RACER = """
import json, sys, time
from pathlib import Path
from compress.recipe import config_from_dict
from compress.teacher_cache.generate import generate
ready, other = Path(sys.argv[2]), Path(sys.argv[3])
ready.touch()
deadline = time.time() + 60
while not other.exists() and time.time() < deadline:  # both imported: start together
    time.sleep(0.01)
report = generate(config_from_dict(json.loads(sys.argv[1])), wait=True, progress=False)
print(json.dumps({"computed": report.computed, "complete": report.complete}))
"""


@pytest.mark.slow
def test_two_generators_started_together_write_each_shard_once(tmp_path):
    data = config_dict(tmp_path, shard_size=2)
    data["data"]["train"]["num_samples"] = 12  # 6 shards
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    flags = [tmp_path / "ready-0", tmp_path / "ready-1"]
    procs = [subprocess.Popen([sys.executable, "-c", RACER, json.dumps(data), str(flags[i]), str(flags[1 - i])],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert all(r["complete"] for r in reports)
    first, second = (set(r["computed"]) for r in reports)
    assert not first & second and first | second == set(range(6))
    assert CacheStore(cache_root(config_from_dict(data))).complete()
