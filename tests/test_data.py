"""Tests of compress.data: synthetic shapes, CSV, webdataset, image folders, robustness."""

from __future__ import annotations

import io
import itertools
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from compress.config import ConfigError, DataConfig, DatasetConfig, ZeroShotTaskConfig
from compress.data import (
    CLIP_MEAN,
    CLIP_STD,
    BadSampleCounter,
    DataError,
    ShapesClassification,
    ShapesDataset,
    build_dataset,
    build_eval_loader,
    build_retrieval_set,
    build_train_loader,
    build_zero_shot_task,
    eval_transform,
    imagenet_preset,
    make_collate,
    train_transform,
)
from compress.data.captions import task_classnames
from compress.data.shapes import COLOR_NAMES, HELDOUT, SHAPES, combo_label, position_name
from compress.recipe import config_from_dict

TO_TENSOR = T.ToTensor()
PALETTE = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


@pytest.fixture(scope="module")
def tokenizer():
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32")


def _solid(color: tuple[int, int, int], size: tuple[int, int] = (20, 16)) -> Image.Image:
    return Image.new("RGB", size, color)


def _image_bytes(color: tuple[int, int, int], fmt: str) -> bytes:
    buf = io.BytesIO()
    _solid(color).save(buf, format=fmt)
    return buf.getvalue()


def _mean_rgb(x: torch.Tensor) -> tuple[int, ...]:
    """Mean colour (0-255) of an unnormalised [3,H,W] tensor."""
    return tuple(int(round(v)) for v in (x.mean(dim=(1, 2)) * 255).tolist())


# ----------------------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic_by_seed_split_and_index():
    a, b = ShapesDataset(seed=0, num_samples=100), ShapesDataset(seed=0, num_samples=100)
    order = [7, 3, 50, 3]  # random access in any order gives the same sample
    for i in order:
        (ia, ca), (ib, cb) = a.pil(i), b.pil(i)
        assert ia.tobytes() == ib.tobytes() and ca == cb
    other = ShapesDataset(seed=1, num_samples=100)
    val = ShapesDataset(seed=0, split="val", num_samples=100)
    for ds in (other, val):
        same = sum(a.pil(i)[0].tobytes() == ds.pil(i)[0].tobytes() for i in range(20))
        assert same == 0
    assert [a.pil(i)[1] for i in range(20)] != [other.pil(i)[1] for i in range(20)]


def test_heldout_combos_never_in_train_and_present_in_val():
    assert {c for c, _ in HELDOUT} == set(range(len(COLOR_NAMES)))
    assert {s for _, s in HELDOUT} == set(range(len(SHAPES)))
    train = ShapesDataset(seed=3, split="train", num_samples=3000)
    seen = set()
    for i in range(len(train)):
        seen.update(train.scene(i)[0].combos)
    assert not seen & HELDOUT
    assert len(seen) == len(COLOR_NAMES) * len(SHAPES) - len(HELDOUT)
    val = ShapesDataset(seed=3, split="val", num_samples=1000)
    val_seen = set(itertools.chain.from_iterable(val.scene(i)[0].combos for i in range(len(val))))
    assert HELDOUT <= val_seen


def test_enough_classes_and_captions_name_colour_and_shape():
    assert len(task_classnames("color_shape")) >= 40
    ds = ShapesDataset(seed=0, num_samples=600)
    texts = set()
    for i in range(len(ds)):
        scene, text = ds.scene(i)
        texts.add(text)
        for obj in scene.objects:
            assert obj.color_name in text and obj.shape_name in text, text
    assert sum(len(ds.scene(i)[0].objects) == 2 for i in range(len(ds))) > 100  # two-shape images exist
    assert len(texts) > 300  # varied captions


def test_classification_images_have_one_shape_of_the_labelled_colour():
    ds = ShapesClassification("color_shape", seed=0, num_samples=80)
    labels = [ds.label(i) for i in range(len(ds))]
    assert sorted(set(labels)) == list(range(40))
    for i in range(len(ds)):
        scene = ds.scene(i)
        assert len(scene.objects) == 1 and scene.objects[0].label == labels[i]
        img, label = ds[i]
        obj = scene.objects[0]
        centre = np.asarray(img)[int(obj.cy), int(obj.cx)]
        assert np.abs(centre.astype(int) - np.array(obj.rgb)).max() <= 1  # the shape is drawn there
        assert label == labels[i]
    shape_ds = ShapesClassification("shape", seed=0, num_samples=40)
    assert [shape_ds.label(i) for i in range(40)] == [k % len(SHAPES) for k in range(40)]


def test_synthetic_zero_shot_tasks_report_heldout_labels():
    data = DataConfig(train=DatasetConfig(kind="synthetic"), val=DatasetConfig(kind="synthetic", num_samples=120))
    task = build_zero_shot_task(ZeroShotTaskConfig(name="cs", task="color_shape"), train_transform(32), data, 16)
    assert len(task.classnames) == 40 and len(task.dataset) == 120
    assert task.heldout_labels == sorted(combo_label(c, s) for c, s in HELDOUT)
    assert all("{}" in t for t in task.templates) and task.prompts("red circle")[0].count("red circle") == 1
    batch = next(iter(task.loader))
    assert batch["images"].shape == (16, 3, 32, 32) and batch["labels"].tolist() == list(range(16))
    color = build_zero_shot_task(ZeroShotTaskConfig(task="color"), None, data)
    assert color.classnames == list(COLOR_NAMES) and color.heldout_labels == []
    no_holdout = DataConfig(train=DatasetConfig(options={"holdout": False}))
    assert build_zero_shot_task(ZeroShotTaskConfig(task="color_shape"), None, no_holdout).heldout_labels == []
    with pytest.raises(DataError, match="unknown synthetic task"):
        build_zero_shot_task(ZeroShotTaskConfig(task="size"), None, data)


def test_synthetic_options_are_checked():
    with pytest.raises(DataError, match="unknown option"):
        build_dataset(DatasetConfig(options={"colour": 1}), None)
    ds = build_dataset(DatasetConfig(num_samples=4, options={"size": 48, "cache": True}), None)
    assert ds.pil(0)[0].size == (48, 48) and ds.pil(0) is ds.pil(0)


def test_synthetic_train_loader_reshuffles_per_epoch_and_is_reproducible(tokenizer):
    data = DataConfig(train=DatasetConfig(num_samples=32))
    make = lambda: build_train_loader(data, train_transform(32), tokenizer, batch_size=8, seed=5)  # noqa: E731
    loader = make()
    assert len(loader) == 4
    batches = list(itertools.islice(loader.forever(), 8))
    assert loader.epoch == 1
    first, second = [b["captions"] for b in batches[:4]], [b["captions"] for b in batches[4:]]
    assert sorted(sum(first, [])) == sorted(sum(second, [])) and first != second
    again = list(itertools.islice(make().forever(), 4))
    assert [b["captions"] for b in again] == first
    b = batches[0]
    assert b["images"].shape == (8, 3, 32, 32) and b["texts"].shape == (8, 77) and b["texts"].dtype == torch.long
    ds = ShapesDataset(num_samples=32)
    in_order = [ds.pil(i)[1] for i in range(8)]
    for sampler in (torch.utils.data.SequentialSampler(ds), torch.utils.data.SequentialSampler):
        seq = build_train_loader(data, T.ToTensor(), None, 8, sampler=sampler)  # instance or factory
        assert next(iter(seq))["captions"] == in_order
    assert loader.counter.bad == 0 and loader.counter.seen == 64


@pytest.mark.parametrize("workers", [1, 2])
def test_training_images_do_not_depend_on_the_number_of_workers(tokenizer, workers):
    """data.num_workers is left out of the run id: the random crops must not depend on it."""
    def first_batches(num_workers: int) -> list[torch.Tensor]:
        data = DataConfig(train=DatasetConfig(num_samples=32), num_workers=num_workers)
        loader = build_train_loader(data, train_transform(32), tokenizer, batch_size=8, seed=3, pin_memory=False)
        return [b["images"] for b in itertools.islice(loader.forever(), 5)]  # into the second epoch

    inline, parallel = first_batches(0), first_batches(workers)
    for a, b in zip(inline, parallel, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(inline[0], inline[4])  # and the crops still vary


def test_synthetic_retrieval_view_uses_full_captions():
    ret = build_retrieval_set(DataConfig(), T.ToTensor())
    assert ret is not None and len(ret.dataset) == 1000
    img, _ = ret.dataset[0]
    assert img.shape == (3, 64, 64)

    def named(o):
        words = f"{o.size_word} {o.color_name} {o.shape_name}"
        return ("an " if words[0] in "aeiou" else "a ") + words

    kinds = set()
    for i in range(40):  # every caption names size, colour, shape and place (or the relation), nothing else
        scene, text = ret.dataset.scene(i)
        if len(scene.objects) == 1:
            obj = scene.objects[0]
            assert text == f"{named(obj)} in the {position_name(obj, 64)}"
        else:
            a, b = scene.objects
            assert text == f"{named(a)} {scene.relation} {named(b)}"
        kinds.add(len(scene.objects))
    assert kinds == {1, 2}
    assert build_retrieval_set(DataConfig(train=DatasetConfig(kind="csv", path="x.csv")), None) is None


# ----------------------------------------------------------------------------- CSV
def _write_csv_set(root: Path, sep: str = ",", keys: tuple[str, str] = ("filepath", "title")) -> dict[str, str]:
    """4 good images (PNG + JPEG, one in a subfolder), one corrupt, one missing."""
    (root / "img").mkdir(parents=True)
    good = {}
    for name, fmt in (("red", "PNG"), ("green", "JPEG"), ("blue", "PNG"), ("white", "JPEG")):
        rel = f"img/{name}.{'png' if fmt == 'PNG' else 'jpg'}"
        (root / rel).write_bytes(_image_bytes(PALETTE[name], fmt))
        good[rel] = f"a {name} picture"
    (root / "img" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    rows = list(good.items()) + [("img/corrupt.jpg", "a corrupt one"), ("img/missing.png", "a missing one")]
    lines = [sep.join(keys)] + [sep.join(r) for r in rows]
    (root / "data.csv").write_text("\n".join(lines) + "\n")
    return good


def test_csv_loads_good_rows_and_skips_and_counts_bad_ones(tmp_path, tokenizer):
    good = _write_csv_set(tmp_path)
    cfg = DatasetConfig(kind="csv", path=str(tmp_path / "data.csv"), max_bad_fraction=0.5)
    ds = build_dataset(cfg, T.ToTensor())
    items = [ds[i] for i in range(len(ds))]
    assert len(items) == 6 and items[4] is None and items[5] is None
    for text, (img, caption) in zip(good.values(), items[:4], strict=True):
        assert caption == text
        name = text.split()[1]
        assert max(abs(a - b) for a, b in zip(_mean_rgb(img), PALETTE[name], strict=True)) <= 3
    loader = build_eval_loader(ds, batch_size=4, collate_fn=make_collate(tokenizer), name="csv", max_bad_fraction=0.5)
    captions = [c for b in loader for c in b["captions"]]
    assert captions == list(good.values())
    assert (loader.counter.bad, loader.counter.seen) == (2, 6)
    assert loader.counter.as_dict()["data_bad_samples"] == 2


def test_tsv_with_custom_columns(tmp_path):
    good = _write_csv_set(tmp_path, sep="\t", keys=("path", "caption"))
    cfg = DatasetConfig(kind="csv", path=str(tmp_path / "data.csv"), separator="\t", image_key="path",
                        caption_key="caption")
    ds = build_dataset(cfg, T.ToTensor())
    assert [ds[i][1] for i in range(4)] == list(good.values())
    with pytest.raises(DataError, match="not found"):
        build_dataset(DatasetConfig(kind="csv", path=str(tmp_path / "data.csv"), separator="\t"), None)


def test_exceeding_max_bad_fraction_raises(tmp_path, tokenizer):
    (tmp_path / "ok.png").write_bytes(_image_bytes((9, 9, 9), "PNG"))
    rows = ["filepath,title"] + [f"ok.png,good {i}" for i in range(50)] + [f"gone{i}.png,bad" for i in range(10)]
    (tmp_path / "d.csv").write_text("\n".join(rows))
    data = DataConfig(train=DatasetConfig(kind="csv", path=str(tmp_path / "d.csv"), max_bad_fraction=0.05,
                                          bad_window=60))
    loader = build_train_loader(data, T.ToTensor(), tokenizer, batch_size=10, seed=0)
    with pytest.raises(DataError, match=r"csv.*d\.csv.*of the last 6\d samples.*fraction 0\.1"):
        list(itertools.islice(loader.forever(), 20))
    # a whole batch of bad samples stops at once
    (tmp_path / "bad.csv").write_text("filepath,title\n" + "\n".join(f"no{i}.png,x" for i in range(8)))
    data = DataConfig(train=DatasetConfig(kind="csv", path=str(tmp_path / "bad.csv"), max_bad_fraction=0.5))
    with pytest.raises(DataError, match="whole batch"):
        next(build_train_loader(data, T.ToTensor(), tokenizer, batch_size=4).forever())


def test_bad_sample_counter_thresholds():
    c = BadSampleCounter("demo", max_bad_fraction=0.1, window=50)
    c.update(3, 10)  # 30 % but under the window
    with pytest.raises(DataError, match=r"demo.*7 of the last 50.*0\.140"):
        for _ in range(4):
            c.update(1, 10)  # 7/50 = 14 %
    c2 = BadSampleCounter("whole", max_bad_fraction=0.9)
    c2.update(2, 2)  # one small bad first batch (batch_size 2, a corrupt first image) does not stop a run
    with pytest.raises(DataError, match="whole batch"):
        for _ in range(3):
            c2.update(2, 2)  # but 8 bad samples and no good one yet: a broken source stops at once
    assert c2.seen == 8
    c3 = BadSampleCounter("tail", max_bad_fraction=0.9)
    c3.update(0, 32)
    c3.update(2, 2)  # a small all-bad (last) batch after good data only counts
    with pytest.raises(DataError, match="whole batch of 8"):
        c3.update(8, 8)


def _csv_with_bad(root: Path, n: int, bad: set[int]) -> Path:
    """``n`` rows; row ``i`` is a solid image whose red value is ``i`` (caption ``"row i"``),
    or a missing file for ``i`` in ``bad``."""
    rows = ["filepath,title"]
    for i in range(n):
        if i in bad:
            rows.append(f"gone{i}.png,row {i}")
        else:
            _solid((i % 256, 7, 9)).save(root / f"{i}.png")
            rows.append(f"{i}.png,row {i}")
    (root / "d.csv").write_text("\n".join(rows))
    return root / "d.csv"


def test_train_batches_keep_their_size_with_bad_samples_mixed_in(tmp_path, tokenizer):
    from compress.step_inputs import split_batch

    bad = {i for i in range(40) if i % 5 == 2}  # 8 of 40 bad
    path = _csv_with_bad(tmp_path, 40, bad)
    data = DataConfig(train=DatasetConfig(kind="csv", path=str(path), max_bad_fraction=0.5))
    loader = build_train_loader(data, T.ToTensor(), tokenizer, batch_size=8, seed=3)
    batches = list(itertools.islice(loader.forever(), 12))  # 96 good samples: more than 3 epochs
    for batch in batches:
        assert batch["images"].shape[0] == batch["texts"].shape[0] == len(batch["captions"]) == 8
        rows = [int(c.split()[1]) for c in batch["captions"]]
        assert not set(rows) & bad
        assert [_mean_rgb(img)[0] for img in batch["images"]] == rows  # images stay with their captions
        micro = split_batch(batch, 4)  # gradient accumulation needs equal micro-batches
        assert [len(m["images"]) for m in micro] == [2] * 4 and sum((m["captions"] for m in micro), []) == \
            batch["captions"]
    drawn = [int(c.split()[1]) for b in batches[:4] for c in b["captions"]]
    assert sorted(drawn) == sorted(set(range(40)) - bad)  # the first 4 batches: one epoch's good samples
    assert (loader.counter.bad, loader.counter.seen) == (24, 120)  # 3 epochs of 40, 8 bad in each


def test_one_bad_image_early_does_not_abort_a_run(tmp_path, tokenizer):
    path = _csv_with_bad(tmp_path, 250, {3})  # 0.4 % bad, but 1 of the first 64 samples (1.6 %)
    data = DataConfig(train=DatasetConfig(kind="csv", path=str(path)))  # max_bad_fraction 0.01
    seq = torch.utils.data.SequentialSampler
    loader = build_train_loader(data, T.ToTensor(), tokenizer, batch_size=16, sampler=seq)
    batches = list(itertools.islice(loader.forever(), 80))  # 1280 samples, past the default window of 1000
    assert len(batches) == 80 and loader.counter.seen >= 1280
    assert loader.counter.bad == loader.epoch + 1  # row 3, once in every epoch read


@pytest.mark.parametrize("window", [100, 400])
def test_a_bad_stream_aborts_once_the_window_is_read(tmp_path, tokenizer, window):
    path = _csv_with_bad(tmp_path, 100, set(range(0, 100, 10)))  # 10 % bad
    data = DataConfig(train=DatasetConfig(kind="csv", path=str(path), max_bad_fraction=0.05, bad_window=window))
    loader = build_train_loader(data, T.ToTensor(), tokenizer, batch_size=10)
    with pytest.raises(DataError, match=r"of the last \d+ samples were bad .*fraction 0\.1"):
        for _ in loader.forever():
            assert loader.counter.seen < window  # no verdict before the window is read
    assert window <= loader.counter.seen < window + 10


def test_data_settings_are_checked_at_validation():
    models = {"teacher": {"model": "cc-test-teacher", "random_init": True}, "student": {"model": "cc-test-student"}}
    for key, value in (("max_bad_fraction", 5), ("max_bad_fraction", -0.1), ("max_bad_fraction", 1.0),
                       ("bad_window", 0), ("num_samples", 0), ("kind", "csvv")):
        with pytest.raises(ConfigError, match=rf"^data\.train\.{key}: "):
            config_from_dict({**models, "data": {"train": {key: value}}})
    with pytest.raises(ConfigError, match=r"data\.val\.max_bad_fraction"):
        config_from_dict({**models, "data": {"val": {"max_bad_fraction": 2}}})
    with pytest.raises(ConfigError, match="image_size"):  # each model's own size is used; no override
        config_from_dict({**models, "data": {"image_size": 64}})
    assert config_from_dict({**models, "data": {"train": {"bad_window": 50}}}).data.train.bad_window == 50


# ----------------------------------------------------------------------------- webdataset
def _write_shards(root: Path) -> dict[str, str]:
    """Two shards of 5 samples; sample s1_2 has a corrupt image. Caption -> colour name."""
    names = list(PALETTE)
    expected = {}
    for shard in range(2):
        with tarfile.open(root / f"shard-{shard:06d}.tar", "w") as tar:
            for k in range(5):
                key, name = f"s{shard}_{k}", names[(shard * 5 + k) % len(names)]
                fmt = "PNG" if k % 2 else "JPEG"
                data = _image_bytes(PALETTE[name], fmt) if key != "s1_2" else b"garbage, not an image"
                text = f"{key} is {name}".encode()
                for suffix, payload in ((("png" if fmt == "PNG" else "jpg"), data), ("txt", text)):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                if key != "s1_2":
                    expected[text.decode()] = name
    return expected


@pytest.mark.parametrize("workers", [0, 2])
def test_webdataset_shards_pairs_and_corrupt_counted(tmp_path, tokenizer, workers):
    expected = _write_shards(tmp_path)
    cfg = DatasetConfig(kind="webdataset", path=str(tmp_path / "shard-{000000..000001}.tar"), split="val")
    ds = build_dataset(cfg, T.ToTensor())
    loader = build_eval_loader(ds, 3, make_collate(tokenizer), num_workers=workers, max_bad_fraction=0.5)
    got = {}
    for batch in loader:
        assert batch["texts"].shape[0] == batch["images"].shape[0] == len(batch["captions"])
        for img, caption in zip(batch["images"], batch["captions"], strict=True):
            got[caption] = _mean_rgb(img)
    assert set(got) == set(expected)
    for caption, rgb in got.items():
        assert max(abs(a - b) for a, b in zip(rgb, PALETTE[expected[caption]], strict=True)) <= 3
    assert (loader.counter.bad, loader.counter.seen) == (1, 10)


def test_webdataset_train_loader_shuffles_and_survives_a_broken_shard(tmp_path, tokenizer):
    expected = _write_shards(tmp_path)
    (tmp_path / "shard-000002.tar").write_bytes(b"not a tar file at all" * 10)
    cfg = DatasetConfig(kind="webdataset", path=str(tmp_path / "shard-{000000..000002}.tar"), num_samples=9,
                        max_bad_fraction=0.5, options={"shuffle_buffer": 4})
    loader = build_train_loader(DataConfig(train=cfg, num_workers=1), T.ToTensor(), tokenizer, batch_size=3)
    assert len(loader) == 3
    batches = list(itertools.islice(loader.forever(), 6))
    captions = [c for b in batches for c in b["captions"]]
    assert set(captions) <= set(expected) and len(set(captions)) >= 6
    assert loader.counter.bad >= 2 and loader.epoch >= 1  # corrupt image + unreadable shard, per epoch
    assert [len(b["images"]) for b in batches] == [3] * 6  # refilled from the next samples of the stream
    for batch in batches:  # every image still belongs to its caption after shuffling and refilling
        for img, caption in zip(batch["images"], batch["captions"], strict=True):
            assert max(abs(a - b) for a, b in zip(_mean_rgb(img), PALETTE[expected[caption]], strict=True)) <= 3


# ----------------------------------------------------------------------------- image folder
def test_image_folder_zero_shot_task_maps_labels(tmp_path):
    classes = {"n001_cat": "red", "n002_dog_house": "green", "n003_zebra": "blue"}
    for d, color in classes.items():
        (tmp_path / d).mkdir()
        for k in range(2):
            _solid(PALETTE[color]).save(tmp_path / d / f"{k}.jpg")
    (tmp_path / "n003_zebra" / "broken.jpg").write_bytes(b"nope")
    task = build_zero_shot_task(ZeroShotTaskConfig(name="f", kind="folder", path=str(tmp_path)), T.ToTensor(),
                                batch_size=8, max_bad_fraction=0.5)
    assert task.classnames == ["n001 cat", "n002 dog house", "n003 zebra"]
    assert task.templates and all("{}" in t for t in task.templates)
    colors = list(classes.values())
    items = [task.dataset[i] for i in range(len(task.dataset))]
    assert sum(x is None for x in items) == 1
    for img, label in (x for x in items if x is not None):
        assert max(abs(a - b) for a, b in zip(_mean_rgb(img), PALETTE[colors[label]], strict=True)) <= 3
    loader = task.loader
    labels = [y for b in loader for y in b["labels"].tolist()]
    assert labels == [0, 0, 1, 1, 2, 2] and loader.counter.bad == 1
    names = build_zero_shot_task(ZeroShotTaskConfig(kind="folder", path=str(tmp_path), classnames=["a", "b", "c"]),
                                 None)
    assert names.classnames == ["a", "b", "c"]
    with pytest.raises(DataError, match="1000 class"):
        build_zero_shot_task(ZeroShotTaskConfig(kind="folder", task="imagenet", path=str(tmp_path)), None)


def test_imagenet_preset():
    names, templates = imagenet_preset()
    assert len(names) == 1000 and len(templates) == 80
    assert names[0] == "tench" and all(t.count("{}") == 1 for t in templates)
    assert templates[0].format("tench") == "a bad photo of a tench."


def test_folder_as_training_data_captions_from_class_names(tmp_path):
    for d in ("golden_retriever", "tabby_cat"):
        (tmp_path / d).mkdir()
        _solid((1, 2, 3)).save(tmp_path / d / "a.png")
    ds = build_dataset(DatasetConfig(kind="folder", path=str(tmp_path)), T.ToTensor())
    assert "golden retriever" in ds[0][1] and "tabby cat" in ds[1][1]


# ----------------------------------------------------------------------------- transforms, collate
def test_train_transform_shape_and_normalisation():
    tf = train_transform(32)
    mean_img = _solid(tuple(int(round(m * 255)) for m in CLIP_MEAN), (50, 40))
    out = tf(mean_img)
    assert out.shape == (3, 32, 32) and out.abs().max() < 0.02
    white = tf(_solid((255, 255, 255), (40, 40)))
    expect = torch.tensor([(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True)])
    assert torch.allclose(white.mean(dim=(1, 2)), expect, atol=1e-3)
    crop = tf.transforms[0]
    assert crop.scale == (0.9, 1.0) and crop.interpolation == T.InterpolationMode.BICUBIC
    assert eval_transform(32)(_solid((0, 0, 0), (64, 48))).shape == (3, 32, 32)


def test_collate_tokenizes_and_drops_none(tokenizer):
    items = [(torch.zeros(3, 4, 4), "a red circle"), None, (torch.ones(3, 4, 4), "a blue star")]
    batch = make_collate(tokenizer)(items)
    assert batch["images"].shape == (2, 3, 4, 4) and batch["captions"] == ["a red circle", "a blue star"]
    assert batch["texts"].dtype == torch.long and torch.equal(batch["texts"], tokenizer(batch["captions"]))
    assert (batch["num_bad"], batch["num_samples"]) == (1, 3)
    empty = make_collate(tokenizer)([None, None])
    assert empty["images"] is None and empty["num_bad"] == 2


@pytest.mark.parametrize("workers", [0, 2])
def test_webdataset_ranks_read_disjoint_shards_that_cover_the_epoch(tmp_path, tokenizer, monkeypatch, workers):
    """Shards are split by rank (read when the data set is built, in the launching process), then by worker."""
    expected = _write_shards(tmp_path)
    cfg = DatasetConfig(kind="webdataset", path=str(tmp_path / "shard-{000000..000001}.tar"), split="val")
    seen = []
    for rank in range(2):
        monkeypatch.setattr("compress.distributed.rank", lambda r=rank: r)
        monkeypatch.setattr("compress.distributed.world_size", lambda: 2)
        ds = build_dataset(cfg, T.ToTensor())
        monkeypatch.undo()  # the workers and the iteration see no process group: the split was fixed at build
        loader = build_eval_loader(ds, 2, make_collate(tokenizer), num_workers=workers, max_bad_fraction=0.5)
        seen.append({c for batch in loader for c in batch["captions"]})
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(expected)
    assert {c.split("_")[0] for c in seen[0]} == {"s0"}  # rank 0 read shard 0, rank 1 shard 1


def test_webdataset_with_fewer_shards_than_processes_is_refused(tmp_path, monkeypatch):
    _write_shards(tmp_path)
    monkeypatch.setattr("compress.distributed.world_size", lambda: 3)
    cfg = DatasetConfig(kind="webdataset", path=str(tmp_path / "shard-{000000..000001}.tar"))
    with pytest.raises(DataError, match="2 shard\\(s\\) cannot be split across 3 processes"):
        build_dataset(cfg, T.ToTensor())


def test_each_rank_takes_every_nth_index_of_the_same_permutation():
    from compress.data.sampling import EpochShuffleSampler

    for epoch in (0, 3):
        whole = EpochShuffleSampler(11, seed=5)
        parts = [EpochShuffleSampler(11, seed=5, rank=r, world=2) for r in range(2)]
        for s in (whole, *parts):
            s.set_epoch(epoch)
        order = list(whole)
        assert [list(p) for p in parts] == [order[0:10:2], order[1:10:2]]  # the tail (11th) cut, as drop_last
        assert len(parts[0]) == 5


# ----------------------------------------------------------------------------- truncated and damaged shards
def _numbered_shards(root: Path, shards: int = 2, per_shard: int = 100) -> str:
    """``shards`` tars of ``per_shard`` good samples (a solid PNG, caption ``"s<shard> k<index>"``)."""
    image = _image_bytes(PALETTE["red"], "PNG")
    for s in range(shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for k in range(per_shard):
                for suffix, payload in (("png", image), ("txt", f"s{s} k{k}".encode())):
                    info = tarfile.TarInfo(f"s{s}_{k:04d}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(root / f"{{00000..{shards - 1:05d}}}.tar")


def _damage(path: Path, how: str) -> None:
    """Cut a shard at a third (at a member's header, inside a header or inside a member's data), or
    overwrite 2 KiB in its middle with random bytes."""
    raw = path.read_bytes()
    if how == "garbage":
        mid = len(raw) // 2
        path.write_bytes(raw[:mid] + np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8).tobytes()
                         + raw[mid + 2048:])
        return
    with tarfile.open(path) as tar:
        header = next(m.offset for m in tar.getmembers() if m.offset >= len(raw) // 3)
    path.write_bytes(raw[: header + {"at-member": 0, "in-header": 100, "in-data": 512 + 30}[how]])


def _read_all(pattern: str, max_bad_fraction: float = 1.0) -> tuple[list[str], BadSampleCounter]:
    ds = build_dataset(DatasetConfig(kind="webdataset", path=pattern, split="val"), TO_TENSOR)
    loader = build_eval_loader(ds, 10, make_collate(None), max_bad_fraction=max_bad_fraction)
    return [c for b in loader for c in b["captions"]], loader.counter


@pytest.mark.parametrize("stats", ["img2dataset", "sizes.json", None])
def test_a_shard_cut_at_a_third_counts_its_lost_samples_as_bad(tmp_path, caplog, stats):
    """The issue's case: two shards of 100, the second cut at a third. tarfile reads it as a shard of 35;
    the 65 lost samples are counted from the writer's stats and the shard named. Without stats 1 is counted
    ("at least 1"): the cut took the lost samples' bytes with it, so the file's size cannot tell how many."""
    pattern = _numbered_shards(tmp_path)
    _damage(tmp_path / "00001.tar", "at-member")
    if stats == "img2dataset":
        (tmp_path / "00001_stats.json").write_text('{"count": 100, "successes": 100, "failed_to_download": 3}')
    elif stats == "sizes.json":
        (tmp_path / "sizes.json").write_text('{"00000.tar": 100, "00001.tar": 100}')
    with caplog.at_level("WARNING"):
        captions, counter = _read_all(pattern)
    assert len(captions) == 135
    assert (counter.seen, counter.bad) == ((200, 65) if stats else (136, 1))
    shard_lines = [r.getMessage() for r in caplog.records if "00001.tar" in r.getMessage()]
    assert len(shard_lines) == 1 and "truncated" in shard_lines[0] and "35 sample(s) read" in shard_lines[0]
    assert ("at least 1" in shard_lines[0]) == (stats is None)


@pytest.mark.parametrize("how", ["in-header", "in-data", "garbage"])
def test_a_shard_cut_inside_a_member_or_overwritten_in_the_middle_loses_nothing_silently(tmp_path, caplog, how):
    """With the writer's count every expected sample is accounted for (read good, or counted bad). Without
    it the shard is named in the log and its loss estimated from its size: a cut shard counts 1 ("at least
    1"); one overwritten in the middle counts the bytes after the damaged header over the mean bytes per
    sample read. Every sample here is exactly 2048 bytes (two 512-byte headers, two payloads under 512),
    so the estimate is off only by the tar's record padding (assumed half a 10 KiB record, really 9 KiB
    here: 2 samples too many), the partly read sample in the mean (~1%) and rounding: within 3."""
    pattern = _numbered_shards(tmp_path)
    _damage(tmp_path / "00001.tar", how)
    with caplog.at_level("WARNING"):
        captions, counter = _read_all(pattern)
    assert 100 < len(captions) < 200 and counter.bad >= 1
    line = next(r.getMessage() for r in caplog.records if "truncated or damaged shard" in r.getMessage())
    if how == "garbage":  # the true loss: 47 samples after the damaged header, 1 read without its caption
        assert abs(counter.bad - (200 - len(captions))) <= 3 and "estimated" in line
    else:
        assert counter.bad == 1 and "at least 1" in line
    assert any("00001.tar" in r.getMessage() and "truncated or damaged shard" in r.getMessage() for r in caplog.records)
    (tmp_path / "00001_stats.json").write_text('{"successes": 100}')
    from compress.data.shards import expected_samples

    expected_samples.cache_clear()
    captions, counter = _read_all(pattern)
    assert counter.seen == 200 and counter.bad == 200 - len(captions)


def test_lost_samples_make_max_bad_fraction_stop_a_training_stream(tmp_path, tokenizer):
    pattern = _numbered_shards(tmp_path)
    _damage(tmp_path / "00001.tar", "at-member")
    (tmp_path / "00001_stats.json").write_text('{"successes": 100}')
    cfg = DatasetConfig(kind="webdataset", path=pattern, max_bad_fraction=0.1, bad_window=50)
    loader = build_train_loader(DataConfig(train=cfg), TO_TENSOR, tokenizer, batch_size=10, pin_memory=False)
    with pytest.raises(DataError, match="max_bad_fraction 0.1"):
        for _ in itertools.islice(loader.forever(), 40):
            pass


@pytest.mark.slow
def test_a_run_on_a_truncated_and_a_damaged_shard_reports_the_lost_samples_in_its_row(tmp_path):
    """A real short run on webdataset shards: one cut at a third (its writer's stats say 20 samples), one
    overwritten in the middle. The row's ``data/bad_samples`` counts the lost samples."""
    from compress.run import run_experiment
    from tests.test_run_e2e import tiny_config

    shards = tmp_path / "shards"
    shards.mkdir()
    pattern = _numbered_shards(shards, shards=3, per_shard=20)
    _damage(shards / "00001.tar", "at-member")
    (shards / "00001_stats.json").write_text('{"successes": 20}')
    _damage(shards / "00002.tar", "garbage")
    train = {"kind": "webdataset", "path": pattern, "max_bad_fraction": 0.5, "bad_window": 50}
    cfg = tiny_config(tmp_path, data={"train": train, "val": {"kind": "synthetic", "num_samples": 32}},
                      train={"steps": 6, "batch_size": 8, "lr": 1e-3, "log_every": 1, "progress": False})
    row = run_experiment(cfg)
    assert row["status"] == "completed", row.get("error")
    replay = build_train_loader(cfg.data, TO_TENSOR, None, 8, seed=cfg.seed, pin_memory=False)
    for _ in itertools.islice(replay.forever(), 6):
        pass
    # per epoch the cut shard gives 8 good samples of its 20 (12 counted bad), the overwritten one loses >= 1
    assert row["metrics"]["data/bad_samples"] == replay.counter.bad >= 12 + 1


def test_a_refilled_batch_is_pinned_like_the_loader_pins_its_batches(tmp_path, tokenizer, monkeypatch):
    """On CUDA the loader pins its batches (pin_memory); a batch topped up from the reserve is a new
    concatenation, so it is pinned too, else every step copies it from pageable memory."""
    bad = {i for i in range(40) if i % 5 == 2}
    data = DataConfig(train=DatasetConfig(kind="csv", path=str(_csv_with_bad(tmp_path, 40, bad)),
                                          max_bad_fraction=0.5))
    loader = build_train_loader(data, T.ToTensor(), tokenizer, batch_size=8, seed=3, pin_memory=False)
    loader.loader.pin_memory = True  # as on CUDA (the DataLoader itself does not pin without a GPU)
    pinned: list[int] = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: pinned.append(id(self)) or self)
    batches = list(itertools.islice(loader.forever(), 5))  # 8 of 40 rows bad: some batches are topped up
    topped_up = [b for b in batches if id(b["images"]) in pinned]
    assert topped_up and all(len(b["images"]) == 8 for b in batches)
