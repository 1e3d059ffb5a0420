"""Training on fixed augmentation views and on the teacher-output cache: the views replay their boxes, batches
carry sample ids and view indices, a loss the cache cannot serve is refused, and a run from an fp32 cache trains
as the same run with the teacher online on the same views (also after a resume)."""

from __future__ import annotations

import pytest
import torch

from compress.config import ConfigError
from compress.data import build_dataset
from compress.data.pipeline import train_batches
from compress.data.robust import torch_seeded
from compress.data.transforms import CropViews, preprocess_of
from compress.data.views import FixedViews, FixedViewSamples, view_of, view_seed
from compress.models import load_model
from tests.test_run_e2e import tiny_config

NO_EVAL = {"zero_shot": [], "retrieval": False, "macs": False, "throughput": False}
RN_TEACHER = {"model": "cc-test-rn-teacher", "random_init": True}  # 64 px against the student's 32 px


def test_view_of_uses_every_view_once_in_as_many_epochs():
    for index in range(50):
        assert sorted(view_of(3, e, index, 4) for e in range(8)) == [0, 0, 1, 1, 2, 2, 3, 3]
    firsts = {view_of(3, 0, index, 4) for index in range(50)}
    assert firsts == {0, 1, 2, 3}  # the order differs between samples
    assert [view_of(3, 0, i, 4) for i in range(20)] != [view_of(4, 0, i, 4) for i in range(20)]  # and run seeds


def test_a_fixed_view_is_the_crop_drawn_from_its_key(tmp_path):
    raw = build_dataset(tiny_config(tmp_path).data.train, None)
    student = preprocess_of(load_model("cc-test-student"))
    crop = CropViews({"images": student})
    samples = FixedViewSamples(raw, FixedViews(crop, num_views=3, cache_seed=11), seed=5)
    for epoch, index in [(0, 0), (1, 0), (2, 7), (5, 9)]:
        item = samples[(epoch, index)]
        views, caption = item.item
        view = view_of(5, epoch, index, 3)
        image, expected_caption = raw[index]
        with torch_seeded(view_seed(11, index, view)):
            box = crop.draw(image)
        assert caption == expected_caption and item.key == (epoch, index)
        assert int(views["sample_ids"]) == index and int(views["aug_ids"]) == view
        assert torch.equal(views["images"], crop.apply(image, box)["images"])
    # the same sample in two epochs with the same view is the same tensor; another view is another crop
    a, b = samples[(0, 3)].item[0], samples[(3, 3)].item[0]
    assert torch.equal(a["images"], b["images"]) and int(a["aug_ids"]) == int(b["aug_ids"])


def test_online_mode_batches_carry_ids_and_the_teachers_own_view(tmp_path):
    cfg = tiny_config(tmp_path, teacher=RN_TEACHER, inheritance={"name": "none"}, eval=NO_EVAL,
                      teacher_cache={"mode": "online", "num_augmentations": 2, "dir": str(tmp_path / "c")})
    student, teacher = load_model("cc-test-student"), load_model("cc-test-rn-teacher")
    batches, _ = train_batches(cfg, student, teacher, torch.device("cpu"))
    batch = next(batches)
    assert batch["images"].shape[-1] == 32 and batch["teacher_images"].shape[-1] == 64
    assert batch["sample_ids"].dtype == torch.int64 and batch["sample_ids"].shape == (8,)
    assert [k[1] for k in batch["keys"]] == batch["sample_ids"].tolist()
    assert batch["aug_ids"].tolist() == [view_of(cfg.seed, 0, i, 2) for i in batch["sample_ids"].tolist()]


def test_a_loss_reading_what_the_cache_does_not_store_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"losses\[0\].*image_embeds.*teacher_cache.outputs"):
        tiny_config(tmp_path, teacher=RN_TEACHER, inheritance={"name": "none"},
                    losses=[{"name": "feature_distill", "normalized": False}], teacher_cache={"dir": str(tmp_path)})
    # stored, it is accepted; online, anything is
    embeds = {"teacher": RN_TEACHER, "inheritance": {"name": "none"},
              "losses": [{"name": "feature_distill", "normalized": False}]}
    everything = ["image_features", "text_features", "image_embeds", "text_embeds"]
    tiny_config(tmp_path, **embeds, teacher_cache={"dir": str(tmp_path), "outputs": everything})
    tiny_config(tmp_path, **embeds, teacher_cache={"dir": str(tmp_path), "mode": "online"})


@pytest.mark.parametrize(("section", "message"), [
    ({"mode": "offline"}, r"teacher_cache.mode: 'offline' is not one of cache, online"),
    ({"dtype": "fp8"}, r"teacher_cache.dtype"),
    ({"num_augmentations": 0}, r"teacher_cache.num_augmentations: must be at least 1"),
    ({"outputs": ["image_features"]}, r"teacher_cache.outputs: must hold text_features"),
    ({"outputs": ["image_features", "text_features", "tokens"]}, r"'tokens' is not one of"),
])
def test_bad_teacher_cache_sections_are_refused(tmp_path, section, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, teacher_cache=section)


def test_webdataset_training_data_is_refused_with_a_cache(tmp_path):
    with pytest.raises(ConfigError, match="teacher_cache: the training set is webdataset"):
        tiny_config(tmp_path, teacher_cache={}, data={"train": {"kind": "webdataset", "path": "x-{000..001}.tar",
                                                                "num_samples": 8}})


def test_the_cache_section_enters_the_run_id_but_its_folder_does_not(tmp_path):
    from compress.recipe import run_id_of

    plain = run_id_of(tiny_config(tmp_path))
    cached = run_id_of(tiny_config(tmp_path, teacher_cache={"dir": "a", "shard_size": 10}))
    assert cached != plain
    assert run_id_of(tiny_config(tmp_path, teacher_cache={"dir": "b", "shard_size": 99})) == cached
    assert run_id_of(tiny_config(tmp_path, teacher_cache={"dir": "a", "num_augmentations": 2})) != cached
    assert run_id_of(tiny_config(tmp_path, teacher_cache={"mode": "online"})) != cached


def test_the_dry_run_prints_the_caches_size_state_and_what_it_saves(tmp_path):
    from compress.plan import build_plan, format_plan
    from compress.teacher_cache.generate import generate
    from compress.teacher_cache.identity import cache_root

    section = {"dir": str(tmp_path / "c"), "num_augmentations": 3, "dtype": "fp16", "shard_size": 10}
    cfg = tiny_config(tmp_path, eval=NO_EVAL, teacher_cache=section)
    text = format_plan(build_plan(cfg))
    # cc-test-teacher: embed dim 32; a sample: ok 1 B + 3 boxes 48 B + 3 x 32 fp16 image + 32 fp16 text = 305 B
    assert f"teacher cache  {cache_root(cfg)}" in text and "not written yet" in text
    assert "305 B a sample x 64 samples = ~19 KiB on disk in 7 shard folders" in text
    assert "saved: the teachers never reach the device" in text
    generate(cfg, progress=False)
    assert "complete: 64 samples in 7 shards" in format_plan(build_plan(cfg))
    online = tiny_config(tmp_path, eval=NO_EVAL, teacher_cache={**section, "mode": "online"})
    assert "none read: mode online, the teacher runs on 3 fixed views a sample (seed 0)" in format_plan(
        build_plan(online))


def test_the_memory_estimates_leave_a_cached_teacher_out():
    from compress.config import RunConfig
    from compress.config.schema import TeacherCacheConfig
    from compress.memory import estimate_device_memory, estimate_host_memory

    student, teacher = load_model("cc-test-student"), load_model("cc-test-rn-teacher")
    online, cached = RunConfig(), RunConfig(teacher_cache=TeacherCacheConfig())
    online.train.device = cached.train.device = "cpu"
    params = sum(p.numel() for p in teacher.parameters())
    assert (estimate_device_memory(online, student, teacher).weights
            - estimate_device_memory(cached, student, teacher).weights) == 4 * params
    view = 3 * 64 * 64 * 4  # the 64 px teacher's own view of each sample, fp32
    assert (estimate_host_memory(online, student, teacher).bytes_per_sample
            - estimate_host_memory(cached, student, teacher).bytes_per_sample) == view


def test_in_mode_online_the_storage_keys_do_not_enter_the_run_id(tmp_path):
    from compress.recipe import run_id_of

    online = run_id_of(tiny_config(tmp_path, teacher_cache={"mode": "online"}))
    assert run_id_of(tiny_config(tmp_path, teacher_cache={"mode": "online", "dtype": "fp32"})) == online
    assert run_id_of(tiny_config(tmp_path, teacher_cache={"mode": "online", "outputs": [
        "image_features", "text_features", "image_embeds"]})) == online
    assert run_id_of(tiny_config(tmp_path, teacher_cache={"mode": "online", "seed": 1})) != online


def test_a_sample_the_cache_marks_bad_is_skipped_in_training(tmp_path):
    """Sample 3 decodes in training, but its teacher outputs are not in the cache (marked not ok): it is a bad
    sample, counted and replaced, never trained on zero features."""
    import numpy as np

    from compress.teacher_cache.generate import generate
    from compress.teacher_cache.store import CacheStore

    section = {"dir": str(tmp_path / "c"), "num_augmentations": 2, "dtype": "fp32", "shard_size": 100}
    cfg = tiny_config(tmp_path, eval=NO_EVAL, teacher_cache=section)
    root = generate(cfg, progress=False).root
    ok_file = next(root.glob("shard-000000/ok.npy"))
    ok = np.load(ok_file)
    ok[3] = False
    np.save(ok_file, ok)
    store = CacheStore(root)
    assert not bool(store.ok([3])[0])
    batches, stats = train_batches(cfg, load_model("cc-test-student"), None, torch.device("cpu"), store)
    seen = [i for _ in range(16) for i in next(batches)["sample_ids"].tolist()]  # about two epochs of 64 samples
    assert 3 not in seen and set(seen) == set(range(64)) - {3}
    assert stats.as_metrics()["data/bad_samples"] >= 1


def test_writing_the_cache_in_a_run_leaves_its_random_state_and_a_resume_checks_the_cache(tmp_path):
    """A run that wrote its cache continues from the random state of one that found it written; a checkpoint
    trained on another cache (the data or teachers changed under the same config) is not resumed."""
    from types import SimpleNamespace

    from compress.checkpoint import CheckpointError
    from compress.teacher_cache.for_run import check_cache_of_checkpoint, open_teacher_cache
    from compress.teacher_cache.identity import cache_id_of

    cfg = tiny_config(tmp_path, eval=NO_EVAL, teacher_cache={"dir": str(tmp_path / "c"), "shard_size": 100})
    torch.manual_seed(123)
    before = torch.get_rng_state()
    store = open_teacher_cache(cfg)
    assert store.complete() and torch.equal(torch.get_rng_state(), before)
    check_cache_of_checkpoint(SimpleNamespace(meta={"teacher_cache_id": cache_id_of(cfg)}, path="ck"), cfg)
    check_cache_of_checkpoint(SimpleNamespace(meta={}, path="ck"), cfg)  # written before caches existed
    with pytest.raises(CheckpointError, match="trained on teacher cache 0123.*start fresh with --force"):
        check_cache_of_checkpoint(SimpleNamespace(meta={"teacher_cache_id": "0123"}, path="ck"), cfg)
