"""clip_benchmark's webdataset format: what the writer writes, clip_benchmark 1.6.2 reads (and the
project's reader reads the same samples, class names and templates)."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest
from PIL import Image

from compress.data.benchmark_export import export_synthetic, synthetic_set_names
from compress.data.benchmark_sets import (
    WdsEvalSet,
    locate,
    read_wds_info,
    write_wds_classification,
    write_wds_retrieval,
)
from compress.data.robust import DataError


def _images(n: int, size: int = 8) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_classification_layout_and_reader(tmp_path):
    images = _images(5)
    folder = write_wds_classification(
        tmp_path, "vtab/tiny", images, [0, 1, 2, 1, 0], ["cat", "dog", "red car"], ["a photo of a {}.", "a {c}."],
        shard_size=2,
    )
    assert folder == tmp_path / "wds_vtab-tiny"
    assert (folder / "test" / "nshards.txt").read_text() == "3\n"
    assert (folder / "classnames.txt").read_text() == "cat\ndog\nred car\n"
    assert (folder / "zeroshot_classification_templates.txt").read_text() == "a photo of a {c}.\na {c}.\n"
    assert not (folder / "dataset_type.txt").exists()
    with tarfile.open(folder / "test" / "0.tar") as tar:
        assert tar.getnames() == ["s0000000.png", "s0000000.cls", "s0000001.png", "s0000001.cls"]
        assert tar.extractfile("s0000001.cls").read() == b"1"
    assert locate(tmp_path, "vtab/tiny") == folder
    ds = WdsEvalSet(folder)
    assert ds.kind == "classification" and len(ds) == 5 and ds.labels == [0, 1, 2, 1, 0]
    assert ds.info.classnames == ["cat", "dog", "red car"]
    image, label = ds[3]
    assert label == 1 and np.array_equal(_pixels(image), _pixels(images[3]))


def test_retrieval_layout_and_reader(tmp_path):
    captions = [["a cat", "a small cat"], ["a dog"], ["two\nlines"]]
    folder = write_wds_retrieval(tmp_path, "tiny_ret", _images(3), captions)
    assert (folder / "dataset_type.txt").read_text() == "retrieval\n"
    ds = WdsEvalSet(folder)
    assert ds.kind == "retrieval" and ds.captions == [["a cat", "a small cat"], ["a dog"], [r"two\nlines"]]
    assert ds[0][1] == ["a cat", "a small cat"]


def test_writer_refuses_bad_input(tmp_path):
    with pytest.raises(DataError, match="placeholder"):
        write_wds_classification(tmp_path, "x", _images(1), [0], ["a"], ["no placeholder"])
    with pytest.raises(DataError, match="not a class index"):
        write_wds_classification(tmp_path, "x", _images(1), [3], ["a"], ["{c}"])
    with pytest.raises(DataError, match="one line"):
        write_wds_classification(tmp_path, "x", _images(1), [0], ["a\nb"], ["{c}"])
    with pytest.raises(DataError, match="no caption"):
        write_wds_retrieval(tmp_path, "y", _images(1), [[]])
    with pytest.raises(DataError, match="nshards"):
        read_wds_info(tmp_path / "nowhere")


def test_clip_benchmark_reads_what_we_write(tmp_path):
    pytest.importorskip("clip_benchmark", reason="clip_benchmark is in the eval extra")
    from clip_benchmark.datasets.builder import build_dataset

    images = _images(5)
    cls_dir = write_wds_classification(tmp_path, "tiny", images, [2, 0, 1, 1, 2], ["a", "b", "c"], ["x {c}"],
                                       shard_size=2)
    ds = build_dataset("wds/tiny", root=str(cls_dir), transform=_pixels, split="test", task="zeroshot_classification")
    assert ds.classes == ["a", "b", "c"] and ds.templates == ["x {c}"]
    got = list(ds)
    assert [int(y) for _, y in got] == [2, 0, 1, 1, 2]
    assert all(np.array_equal(x, _pixels(im)) for (x, _), im in zip(got, images, strict=True))
    captions = [["a cat", "a small cat"], ["a dog"], ["a bird"]]
    ret_dir = write_wds_retrieval(tmp_path, "tiny_ret", images[:3], captions, shard_size=2)
    ret = build_dataset("wds/tiny_ret", root=str(ret_dir), transform=_pixels, split="test", task="zeroshot_retrieval")
    assert [c for _, c in ret] == captions


def test_export_synthetic_matches_the_in_memory_sets(tmp_path):
    from compress.data.synthetic import ShapesClassification, ShapesDataset, ShapesOptions

    out = export_synthetic(tmp_path, seed=3, num_samples=12, shard_size=5)
    assert sorted(out) == sorted(synthetic_set_names())
    color = WdsEvalSet(out["shapes_color"])
    ref = ShapesClassification("color", 3, "val", 12)
    assert color.labels == [ref.label(i) for i in range(12)]
    assert np.array_equal(_pixels(color[7][0]), _pixels(ref[7][0]))
    assert color.info.templates[0] == "a photo of the {c} shape."
    ret = WdsEvalSet(out["shapes_retrieval"])
    ref_ret = ShapesDataset(3, "val", 12, None, ShapesOptions(caption_style="full"))
    assert ret.captions == [[ref_ret.pil(i)[1]] for i in range(12)]
    assert np.array_equal(_pixels(ret[4][0]), _pixels(ref_ret.pil(4)[0]))
