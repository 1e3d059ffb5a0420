"""The teacher cache's files and identity: a shard written and read back in each dtype (bf16 as its bits), the
reader's order, pickling and bounded maps, what the cache id depends on (and what it does not), the size estimate,
and locking on a file system without flock."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pickle
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.config.schema import ModelSpec, TeacherCacheConfig
from compress.teacher_cache import locking
from compress.teacher_cache import store as store_module
from compress.teacher_cache.identity import (
    CROP_RATIO,
    CROP_SCALE,
    bytes_per_sample,
    cache_id_of,
    cache_identity,
    cache_root,
    estimated_bytes,
)
from compress.teacher_cache.locking import STALE_S, ShardLock
from compress.teacher_cache.store import (
    COMPLETE,
    MANIFEST,
    MIN_OPEN_SHARDS,
    OPEN_SHARDS,
    CacheStore,
    CacheStoreError,
    ShardWriter,
    discard_partial,
    open_shards_limit,
    output_file,
    to_stored,
)
from compress.teacher_cache.verify import _random_pairs
from tests.test_run_e2e import tiny_config

ROOT = Path(__file__).resolve().parents[1]
A, D, SIZE = 3, 8, 4


def write_cache(root: Path, dtype: str, num_samples: int = 10) -> dict[str, torch.Tensor]:
    """A two-teacher cache of random rows written with the store's writer; returns the float32 values written."""
    g = torch.Generator().manual_seed(0)
    values = {"image_features": torch.randn(num_samples, A, D, generator=g),
              "text_features": torch.randn(num_samples, D, generator=g),
              "boxes": torch.randint(0, 60, (num_samples, A, 4), generator=g, dtype=torch.int32),
              "ok": torch.rand(num_samples, generator=g) > 0.2}
    shards = -(-num_samples // SIZE)
    root.mkdir(parents=True)
    manifest = {"num_samples": num_samples, "shard_size": SIZE, "num_shards": shards, "num_augmentations": A,
                "dtype": dtype, "outputs": ["image_features", "text_features"],
                "teachers": [{"image_dim": D, "text_dim": D}] * 2}
    (root / MANIFEST).write_text(json.dumps(manifest))
    for s in range(shards):
        rows = slice(s * SIZE, min((s + 1) * SIZE, num_samples))
        w = ShardWriter(root, s)
        w.write("ok.npy", values["ok"][rows].numpy())
        w.write("boxes.npy", values["boxes"][rows].numpy())
        for k in range(2):
            for name in ("image_features", "text_features"):
                w.write(output_file(name, k), to_stored(values[name][rows] * (k + 1), dtype))
        w.write_meta({"bad": 0, "seconds": 0.0})
        assert w.commit()
    return values


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_a_shard_round_trips_in_each_dtype(tmp_path, dtype):
    values = write_cache(tmp_path / "c", dtype)
    store = CacheStore(tmp_path / "c")
    assert store.complete() and store.missing_shards() == []
    if dtype == "bf16":
        assert np.load(tmp_path / "c" / "shard-000000" / "image_features-0.npy").dtype == np.uint16
    cast = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    ids = torch.tensor([9, 0, 5, 5, 3, 8])  # across shards, repeated, out of order
    augs = torch.tensor([2, 1, 0, 2, 1, 0])
    for k in range(2):
        image = store.outputs("image_features", k, ids, augs)
        text = store.outputs("text_features", k, ids, augs)
        assert image.dtype == torch.float32 and image.shape == (6, D)
        assert torch.equal(image, (values["image_features"][ids, augs] * (k + 1)).to(cast).float())
        assert torch.equal(text, (values["text_features"][ids] * (k + 1)).to(cast).float())
    assert torch.equal(store.boxes(ids, augs), values["boxes"][ids, augs].long())
    assert torch.equal(store.ok(ids), values["ok"][ids])
    assert store.outputs("image_features", 0, torch.tensor([], dtype=torch.long), torch.tensor([])).shape == (0, D)


def test_the_reader_pickles_without_its_maps_and_keeps_a_bounded_number_open(tmp_path):
    write_cache(tmp_path / "c", "fp16", num_samples=40)
    store = CacheStore(tmp_path / "c", open_shards=2)
    for s in range(10):
        store.ok([s * SIZE])
        store.boxes([s * SIZE], [0])
    assert len(store._maps) <= 2 * 4
    clone = pickle.loads(pickle.dumps(store))
    assert clone._maps == {} and clone._manifest is None and clone.root == store.root
    assert torch.equal(clone.boxes([39], [2]), store.boxes([39], [2]))


def test_reading_what_is_not_there_is_one_clear_error(tmp_path):
    with pytest.raises(CacheStoreError, match="no teacher cache .* cache-teacher"):
        CacheStore(tmp_path / "nothing").missing_shards()
    write_cache(tmp_path / "c", "fp32")
    store = CacheStore(tmp_path / "c")
    with pytest.raises(CacheStoreError, match="does not hold 'image_embeds'"):
        store.outputs("image_embeds", 0, [0], [0])
    with pytest.raises(CacheStoreError, match="not teacher 2"):
        store.outputs("image_features", 2, [0], [0])
    with pytest.raises(CacheStoreError, match="view index out of range"):
        store.boxes([0], [A])
    with pytest.raises(CacheStoreError, match="sample id out of range"):
        store.ok([10])
    import shutil

    shutil.rmtree(tmp_path / "c" / "shard-000001")
    assert not store.complete() and store.missing_shards() == [1]
    with pytest.raises(CacheStoreError, match="shard 1 is missing"):
        store.ok([5])


def test_a_shard_appears_only_when_committed_and_a_killed_writers_folder_is_discarded(tmp_path):
    w = ShardWriter(tmp_path, 3)
    w.write("ok.npy", np.ones(2, dtype=bool))
    assert not (tmp_path / "shard-000003").exists()  # a folder named shard-XXXXXX is always complete
    assert discard_partial(tmp_path, 3) == 1 and not w.tmp.exists()
    w = ShardWriter(tmp_path, 3)
    w.write("ok.npy", np.ones(2, dtype=bool))
    assert w.commit() and (tmp_path / "shard-000003" / "ok.npy").is_file()
    again = ShardWriter(tmp_path, 3)  # a second writer (no flock here): the first one's shard stays
    again.write("ok.npy", np.zeros(2, dtype=bool))
    assert not again.commit() and not again.tmp.exists()
    assert np.load(tmp_path / "shard-000003" / "ok.npy").all()


# -- identity -------------------------------------------------------------------------------------------
def _cfg(tmp_path, **changes):
    cfg = tiny_config(tmp_path, teacher_cache={"dir": str(tmp_path / "cache"), "num_augmentations": 2})
    for path, value in changes.items():
        section, _, key = path.rpartition(".")
        target = cfg
        for part in filter(None, section.split(".")):
            target = getattr(target, part)
        setattr(target, key, value)
    return cfg


@pytest.mark.parametrize("change", [
    {"teacher": ModelSpec("cc-test-rn-teacher", random_init=True)},
    {"teachers": [ModelSpec("cc-test-teacher", random_init=True), ModelSpec("cc-test-rn-teacher", random_init=True)]},
    {"data.train.num_samples": 65}, {"data.train.seed": 1}, {"data.train.options": {"noise": 0.1}},
    {"seed": 1},  # a random_init teacher is built after seed_everything(cfg.seed)
    {"teacher_cache.seed": 1}, {"teacher_cache.dtype": "fp32"}, {"teacher_cache.num_augmentations": 3},
    {"teacher_cache.outputs": ["image_features", "text_features", "image_embeds"]},
    {"train.precision": "fp32"},
])
def test_the_cache_id_changes_with_what_determines_the_outputs(tmp_path, change):
    assert cache_id_of(_cfg(tmp_path, **change)) != cache_id_of(_cfg(tmp_path))


@pytest.mark.parametrize("change", [
    {"teacher_cache.dir": "elsewhere"}, {"teacher_cache.shard_size": 7}, {"teacher_cache.mode": "online"},
    {"student": ModelSpec("cc-test-rn-student")}, {"losses": [{"name": "clip"}]}, {"train.lr": 0.5},
    {"train.steps": 99}, {"data.train.max_bad_fraction": 0.5}, {"data.num_workers": 3},
    {"teacher_cache.outputs": ["text_features", "image_features"]},  # the same set
])
def test_the_cache_id_does_not_change_with_the_student_the_training_or_where_it_lives(tmp_path, change):
    assert cache_id_of(_cfg(tmp_path, **change)) == cache_id_of(_cfg(tmp_path))
    assert cache_root(_cfg(tmp_path)) == tmp_path / "cache" / cache_id_of(_cfg(tmp_path))


def test_a_teacher_with_weights_does_not_depend_on_the_run_seed_and_its_file_does(tmp_path):
    weights = tmp_path / "teacher.safetensors"
    weights.write_bytes(b"x" * 10)
    spec = ModelSpec("cc-test-teacher", pretrained=str(weights))
    base = _cfg(tmp_path, teacher=spec)
    assert cache_id_of(dataclasses.replace(base, seed=5)) == cache_id_of(base)
    assert cache_identity(base)["teachers"][0]["files"]  # fingerprinted
    before = cache_id_of(base)
    weights.write_bytes(b"z" * 12)  # the checkpoint replaced at the same path
    assert cache_id_of(base) != before


def test_a_csv_data_file_is_fingerprinted(tmp_path):
    csv = tmp_path / "train.csv"
    csv.write_text("filepath,title\na.png,a cat\n")
    cfg = _cfg(tmp_path, **{"data.train.kind": "csv", "data.train.path": str(csv)})
    before = cache_id_of(cfg)
    csv.write_text("filepath,title\na.png,a dog and more\n")
    assert cache_id_of(cfg) != before


def test_a_data_folder_is_fingerprinted_one_level_deep_without_walking_its_images(tmp_path, monkeypatch):
    import os
    from pathlib import Path

    root = tmp_path / "images"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "a.png").write_bytes(b"x")
    cfg = _cfg(tmp_path, **{"data.train.kind": "folder", "data.train.path": str(root)})
    before = cache_id_of(cfg)
    monkeypatch.setattr(Path, "rglob", lambda *a, **k: (_ for _ in ()).throw(AssertionError("walked the images")))
    assert cache_id_of(cfg) == before
    (root / "cat" / "b.png").write_bytes(b"y")  # an image added to a class folder changes the folder's time
    os.utime(root / "cat", ns=(1, 10**18))
    assert cache_id_of(cfg) != before


def test_the_identity_module_loads_no_torch_and_its_crop_is_the_training_transforms():
    from compress.data import transforms

    assert CROP_SCALE == tuple(transforms.TRAIN_SCALE) and CROP_RATIO == tuple(transforms._RATIO)
    code = "import sys, compress.teacher_cache.identity; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_size_estimate_at_real_size():
    """ViT-B/32 (D=512), fp16, 5 views, features only: 1 + 5*16 + 5*512*2 + 512*2 bytes per sample."""
    per = bytes_per_sample([512], [512], 5, "fp16", ["image_features", "text_features"])
    assert per == 1 + 80 + 5120 + 1024
    outputs = ["image_features", "text_features"]
    assert estimated_bytes(400_000_000, [512], [512], 5, "fp16", outputs) == 400_000_000 * per
    two = bytes_per_sample([512, 768], [512, 768], 2, "fp32", ["image_features", "text_features", "image_embeds"])
    assert two == 1 + 32 + 2 * 2 * (512 + 768) * 4 + (512 + 768) * 4


# -- locking ----------------------------------------------------------------------------------------------
def test_a_lock_is_exclusive_and_a_file_system_without_flock_warns_once(tmp_path, monkeypatch, capsys):
    path = tmp_path / "shard-000000.lock"
    with ShardLock(path, blocking=False) as held:
        assert held
        with ShardLock(path, blocking=False) as other:
            assert not other
    with ShardLock(path, blocking=False) as again:
        assert again  # released on leaving

    def no_flock(fd, flags):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(locking.fcntl, "flock", no_flock)
    monkeypatch.setattr(locking, "_warned", False)
    for _ in range(2):
        with ShardLock(path, blocking=True) as held:
            assert held
    err = capsys.readouterr().err
    assert err.count("no file locks") == 1


def test_the_schema_defaults_are_what_the_identity_reads():
    assert set(TeacherCacheConfig().outputs) == {"image_features", "text_features"}


# -- file descriptors, the completion marker, verify's draws, temporary folders ------------------------------
FD_READER = """
import resource, sys
import numpy as np
from pathlib import Path
from compress.teacher_cache.store import CacheStore
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (200, hard))
store = CacheStore(Path(sys.argv[1]))
for rounds in range(2):
    for s in range(store.num_shards):
        assert store.ok([s * store.shard_size]).shape == (1,)
        store.boxes([s * store.shard_size], [0])
        store.outputs("image_features", 0, [s * store.shard_size], [0])
        store.outputs("text_features", 1, [s * store.shard_size])
print(store.open_shards, len(store._maps))
"""


def test_a_reader_stays_within_a_low_file_descriptor_limit(tmp_path):
    """Each map holds an fd (Python < 3.13): 80 shards x 4 files read under a soft limit of 200 need the LRU sized
    from RLIMIT_NOFILE (the old fixed 8192 shards raised OSError: too many open files)."""
    write_cache(tmp_path / "c", "fp16", num_samples=80 * SIZE)
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", FD_READER, str(tmp_path / "c")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    open_shards, maps = map(int, done.stdout.split())
    assert open_shards == MIN_OPEN_SHARDS and maps <= 4 * open_shards


def test_the_open_shards_follow_the_soft_file_limit(monkeypatch):
    monkeypatch.setattr(store_module.resource, "getrlimit", lambda _: (1024, 4096))
    assert open_shards_limit() == (1024 - 256) // 4 == 192
    monkeypatch.setattr(store_module.resource, "getrlimit", lambda _: (1 << 20, 1 << 20))
    assert open_shards_limit() == OPEN_SHARDS
    monkeypatch.setattr(store_module.resource, "getrlimit", lambda _: (64, 64))
    assert open_shards_limit() == MIN_OPEN_SHARDS
    assert CacheStore("x").open_shards == MIN_OPEN_SHARDS and CacheStore("x", open_shards=3).open_shards == 3


def test_a_complete_cache_is_known_from_its_marker_without_listing_its_shards(tmp_path, monkeypatch):
    write_cache(tmp_path / "c", "fp32", num_samples=10)
    store = CacheStore(tmp_path / "c")
    assert store.complete() and not store.marked_complete()  # listed once: no marker yet
    summary = store.mark_complete()
    assert summary["samples"] == 10 and summary["bytes"] > 0 and store.manifest["summary"] == summary
    assert json.loads((tmp_path / "c" / COMPLETE).read_text()) == summary

    def refuse(*_args, **_kwargs):
        raise AssertionError("a shard folder was looked at")

    monkeypatch.setattr(store_module.os, "listdir", refuse)
    monkeypatch.setattr(Path, "iterdir", refuse)
    monkeypatch.setattr(Path, "is_dir", refuse)
    monkeypatch.setattr(Path, "glob", refuse)
    fresh = CacheStore(tmp_path / "c")
    assert fresh.complete() and fresh.missing_shards() == [] and fresh.written_shards() == [0, 1, 2]
    assert fresh.mark_complete() == summary


def test_a_cache_without_its_marker_is_listed_once_not_stat_per_shard(tmp_path, monkeypatch):
    write_cache(tmp_path / "c", "fp32", num_samples=10)
    monkeypatch.setattr(Path, "is_dir", lambda self: pytest.fail(f"stat of {self}"))
    assert CacheStore(tmp_path / "c").missing_shards() == []


def test_verify_draws_pairs_per_shard_in_memory_independent_of_the_number_of_samples(tmp_path, monkeypatch):
    """Three written shards of a million samples each (the manifest says so): the old draw listed every id
    (3M Python ints, >100 MB); drawing a shard then a row is a few KB."""
    write_cache(tmp_path / "c", "fp32", num_samples=10)
    store = CacheStore(tmp_path / "c")
    big = 10**6
    store._manifest = {**store.manifest, "shard_size": big, "num_samples": 1000 * big, "num_shards": 1000}
    monkeypatch.setattr(store, "ok", lambda ids: torch.ones(len(ids), dtype=torch.bool))
    tracemalloc.start()
    pairs = _random_pairs(store, 200, seed=0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2 * 2**20, peak
    ids = [i for i, _ in pairs]
    assert len(pairs) == 200 and len(set(ids)) == 200 and all(0 <= a < A for _, a in pairs)
    assert {i // big for i in ids} == {0, 1, 2}  # only the written shards, each drawn
    assert _random_pairs(store, 200, seed=0) == pairs  # the seed decides


def test_without_flock_only_temporary_folders_older_than_the_stale_age_are_discarded(tmp_path):
    live, dead = ShardWriter(tmp_path, 3), ShardWriter(tmp_path, 3)
    assert live.tmp != dead.tmp  # one folder per writer (host, pid, random)
    os.utime(dead.tmp, (time.time() - 2 * STALE_S,) * 2)
    assert discard_partial(tmp_path, 3, older_than_s=STALE_S) == 1
    assert live.tmp.is_dir() and not dead.tmp.exists()
    live.write("ok.npy", np.ones(2, dtype=bool))
    assert live.commit()
