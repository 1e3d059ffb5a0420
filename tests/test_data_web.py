"""The synthetic data's ``caption_noise`` option (compress/data/web_captions.py): the exact data unchanged
byte for byte, the shares of each kind of noise as configured, per object in two-shape captions, held-out
pairs never named, and its refusals."""

from __future__ import annotations

import hashlib

import pytest

from compress.data.robust import DataError
from compress.data.shapes import COLOR_NAMES, HELDOUT, SHAPES
from compress.data.synthetic import ShapesDataset, ShapesOptions
from compress.data.web_captions import EXTRA_PREFIXES, EXTRA_SUFFIXES, WEB_LEVELS, CaptionNoise


def dataset(n: int, seed: int = 0, split: str = "train", **options) -> ShapesDataset:
    return ShapesDataset(seed, split, n, options=ShapesOptions.from_dict(options))


def captions_digest(ds: ShapesDataset) -> str:
    return hashlib.sha256("\n".join(ds.scene(i)[1] for i in range(len(ds))).encode()).hexdigest()[:16]


#: sha256 prefixes of the first 600 captions, computed before caption_noise existed (commit e256302)
EXACT = [
    ((0, "train", {}), "d0926e1a60c455a3"),
    ((1, "val", {}), "bd71c1a5c9c67745"),
    ((0, "train", {"caption_style": "full"}), "c58a223ae6c19053"),
    ((3, "train", {"holdout": False, "two_shape_prob": 0.5}), "f8199d995a0525dc"),
]


@pytest.mark.parametrize(("where", "digest"), EXACT)
@pytest.mark.parametrize("noise", ["absent", None, {}, {"color_only": 0.0, "extra_words": 0.0}])
def test_without_noise_every_caption_is_byte_identical_to_before(where, digest, noise):
    seed, split, options = where
    if noise != "absent":
        options = {**options, "caption_noise": noise}
    assert captions_digest(dataset(600, seed, split, **options)) == digest


def test_without_noise_images_and_captions_are_byte_identical_to_before():
    ds, digest = dataset(100), hashlib.sha256()
    for i in range(100):
        img, text = ds.pil(i)
        digest.update(img.tobytes())
        digest.update(text.encode())
    assert digest.hexdigest()[:16] == "031270c9f5a91643"  # before caption_noise existed (commit e256302)


def test_noise_changes_only_the_words_never_the_image_or_the_template():
    """The noise has a generator of its own: the scene (so the image) is the exact data's; the template is too
    (a caption without noise on its objects is the exact caption, up to the extra words)."""
    exact, noisy = dataset(300, two_shape_prob=0.5), dataset(300, two_shape_prob=0.5, caption_noise="web")
    same = 0
    for i in range(300):
        (scene, text), (noisy_scene, noisy_text) = exact.scene(i), noisy.scene(i)
        assert scene == noisy_scene
        same += noisy_text == text
    assert 0.2 < same / 300 < 0.5  # web: half of the objects exact, 70% of captions without extra words


def kinds_of_single_captions(ds: ShapesDataset) -> dict[str, float]:
    """The share of each kind of caption among the single-shape samples, read from the text alone."""
    counts = dict.fromkeys(("exact", "color_only", "shape_only", "wrong_attribute", "extra_words"), 0)
    singles = 0
    for i in range(len(ds)):
        scene, text = ds.scene(i)
        counts["extra_words"] += has_extra(text)
        if len(scene.objects) != 1:
            continue
        singles += 1
        obj, words = scene.objects[0], text.split()
        colors, shapes = [c for c in COLOR_NAMES if c in words], [s for s in SHAPES if s in words]
        if colors and not shapes:
            counts["color_only"] += colors == [obj.color_name]
        elif shapes and not colors:
            counts["shape_only"] += shapes == [obj.shape_name]
        elif (colors, shapes) == ([obj.color_name], [obj.shape_name]):
            counts["exact"] += 1
        else:
            counts["wrong_attribute"] += (colors == [obj.color_name]) != (shapes == [obj.shape_name])
    shares = {k: v / singles for k, v in counts.items()}
    shares["extra_words"] = counts["extra_words"] / len(ds)
    return shares


def has_extra(text: str) -> bool:
    return any(text.startswith(p + " ") for p in EXTRA_PREFIXES) or any(text.endswith(" " + p) for p in EXTRA_SUFFIXES)


@pytest.mark.parametrize("levels", [WEB_LEVELS, {"color_only": 0.5, "wrong_attribute": 0.3, "extra_words": 0.9}])
def test_the_shares_of_each_kind_of_noise_are_the_configured_ones(levels):
    shares = kinds_of_single_captions(dataset(3000, two_shape_prob=0.2, caption_noise=dict(levels)))
    expected = {k: levels.get(k, 0.0) for k in ("color_only", "shape_only", "wrong_attribute", "extra_words")}
    expected["exact"] = 1 - sum(expected[k] for k in ("color_only", "shape_only", "wrong_attribute"))
    for kind, share in expected.items():  # 2400 single-shape captions: a binomial std of at most 1 point
        assert shares[kind] == pytest.approx(share, abs=0.035), kind


def test_web_is_the_benchmarks_default_levels():
    assert ShapesOptions.from_dict({"caption_noise": "web"}).caption_noise == CaptionNoise(**WEB_LEVELS)
    assert WEB_LEVELS == {"color_only": 0.2, "shape_only": 0.2, "wrong_attribute": 0.1, "extra_words": 0.3}


def test_two_shape_captions_get_the_noise_per_object():
    """Colour only for every object: a pair caption names both colours and no shape; shape only: both shapes and
    no colour; half each: all four combinations occur."""
    for noise, named, unnamed in (({"color_only": 1.0}, "color", SHAPES), ({"shape_only": 1.0}, "shape", COLOR_NAMES)):
        ds = dataset(200, two_shape_prob=1.0, caption_noise=noise)
        for i in range(200):
            scene, text = ds.scene(i)
            words = text.split()
            assert not [w for w in unnamed if w in words], text
            for obj in scene.objects:
                assert getattr(obj, f"{named}_name") in words, text
    ds, seen = dataset(400, two_shape_prob=1.0, caption_noise={"color_only": 0.5}), set()
    for i in range(400):
        seen.add(tuple(shape is None for _, shape in noise_names(ds, i)))
    assert seen == {(False, False), (False, True), (True, False), (True, True)}


def noise_names(ds: ShapesDataset, index: int):
    """What the caption of sample ``index`` calls its objects (the noise's own draw, redone)."""
    from compress.data.shapes import sample_rng

    scene, _ = ds.scene(index)
    return ds.options.caption_noise.names(scene, sample_rng(ds.seed, f"{ds.split}/caption_noise", index), ds.allowed)


def test_a_wrong_attribute_never_names_a_held_out_pair_in_training():
    ds = dataset(600, two_shape_prob=0.5, caption_noise={"wrong_attribute": 1.0})
    named = set()
    for i in range(600):
        scene, _ = ds.scene(i)
        names = noise_names(ds, i)
        for obj, (color, shape) in zip(scene.objects, names, strict=True):
            pair = (COLOR_NAMES.index(color), SHAPES.index(shape))
            assert pair != (obj.color, obj.shape) and ((pair[0] == obj.color) != (pair[1] == obj.shape))
            named.add(pair)
    assert not named & HELDOUT
    free = dataset(600, two_shape_prob=0.5, holdout=False, caption_noise={"wrong_attribute": 1.0})
    assert any(set(map(pair_of, noise_names(free, i))) & HELDOUT for i in range(600))


def pair_of(name: tuple[str, str]) -> tuple[int, int]:
    return COLOR_NAMES.index(name[0]), SHAPES.index(name[1])


def test_the_extra_words_name_no_colour_and_no_shape():
    for phrase in (*EXTRA_PREFIXES, *EXTRA_SUFFIXES):
        words = phrase.replace(":", " ").split()
        assert not [w for w in (*COLOR_NAMES, *SHAPES, "shape") if w in words], phrase


def test_colour_only_captions_read_as_english():
    ds = dataset(400, two_shape_prob=0.0, caption_noise={"color_only": 1.0})
    texts = {ds.scene(i)[1] for i in range(400)}
    assert not [t for t in texts if "shape shape" in t]
    assert {"a red shape", "the red shape"} & texts


def test_the_noise_is_a_function_of_the_sample_only():
    ds = dataset(50, caption_noise="web")
    forward = [ds.scene(i)[1] for i in range(50)]
    assert [ds.scene(i)[1] for i in reversed(range(50))] == forward[::-1]
    assert [dataset(50, caption_noise="web").scene(i)[1] for i in range(50)] == forward
    assert [dataset(50, seed=1, caption_noise="web").scene(i)[1] for i in range(50)] != forward


@pytest.mark.parametrize(("noise", "message"), [
    ("webby", "must be 'web' or a mapping"),
    ({"colour_only": 0.1}, r"unknown kind\(s\) \['colour_only'\]"),
    ({"color_only": 1.5}, "caption_noise.color_only must be a probability"),
    ({"extra_words": -0.1}, "caption_noise.extra_words must be a probability"),
    ({"shape_only": True}, "caption_noise.shape_only must be a probability"),
    ({"color_only": 0.5, "shape_only": 0.4, "wrong_attribute": 0.2}, "= 1.1 > 1"),
])
def test_bad_caption_noise_is_refused_naming_it(noise, message):
    with pytest.raises(DataError, match=message):
        ShapesOptions.from_dict({"caption_noise": noise})


def test_extra_words_do_not_count_toward_the_exclusive_sum():
    noise = ShapesOptions.from_dict({"caption_noise": {"color_only": 0.6, "shape_only": 0.4, "extra_words": 1.0}})
    assert noise.caption_noise.exclusive == pytest.approx(1.0)


def test_a_bad_caption_noise_is_refused_with_the_config_before_any_model_is_built():
    from pathlib import Path

    from compress.config import ConfigError
    from compress.recipe import config_from_dict, load_config

    base = load_config(Path(__file__).parent.parent / "experiments" / "configs" / "tiny-test.yaml").to_dict()
    base["data"]["train"]["options"] = {"caption_noise": {"colour_only": 0.1}}
    with pytest.raises(ConfigError, match=r"data.train.options: synthetic data: caption_noise: unknown kind"):
        config_from_dict(base)
    base["data"]["train"]["options"] = {"caption_noise": "web"}
    assert config_from_dict(base).data.train.options == {"caption_noise": "web"}


def test_retrieval_derived_from_noisy_training_data_has_exact_captions():
    """Without ``data.val`` the retrieval set is the synthetic validation split of the training data's options,
    but never its caption noise (retrieval is measured on exact captions)."""
    from compress.config import DataConfig, DatasetConfig
    from compress.data.tasks import build_retrieval_set

    def retrieval_data(options):
        return build_retrieval_set(DataConfig(train=DatasetConfig(num_samples=64, options=options), val=None),
                                   None).dataset

    noisy, exact = retrieval_data({"caption_noise": {"color_only": 1.0}, "size": 32}), retrieval_data({"size": 32})
    assert noisy.options.caption_noise is None and noisy.options.size == 32
    assert [noisy.scene(i)[1] for i in range(20)] == [exact.scene(i)[1] for i in range(20)]
