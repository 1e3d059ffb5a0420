"""Each model gets its own image size and normalisation (its ``preprocess_cfg``); teacher and
student see the same random view, each prepared for itself."""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from open_clip.model import set_model_preprocess_cfg
from open_clip.transform import PreprocessCfg
from PIL import Image
from torch import nn

from compress.config import EvalConfig, ZeroShotTaskConfig
from compress.data import DistillTransform, eval_transform_for, preprocess_of, train_transform, train_transform_for
from compress.data.pipeline import train_batches
from compress.models import load_model
from compress.models.factory import get_model_config
from compress.models.forward import clip_forward, tokenizer_for
from compress.precision import resolve_precision
from compress.recipe import config_from_dict
from compress.teacher import OnlineTeacher

SIGLIP_LIKE = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "resize_mode": "squash", "interpolation": "bilinear"}


def _noise_image(w: int = 50, h: int = 40, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def _student_json(tmp_path: Path, image_size: int) -> Path:
    cfg = get_model_config("cc-test-student")
    cfg["vision_cfg"]["image_size"] = image_size
    path = tmp_path / f"student-{image_size}px.json"
    path.write_text(json.dumps(cfg))
    return path


def _with_preprocess(model: nn.Module, **changes: object) -> nn.Module:
    set_model_preprocess_cfg(model, {**model.visual.preprocess_cfg, **changes})
    return model


@pytest.mark.parametrize("teacher_size", [32, 24])
def test_distill_transform_is_each_models_own_transform_on_one_shared_crop(teacher_size):
    student = PreprocessCfg(size=(24, 24))
    teacher = PreprocessCfg(size=(teacher_size, teacher_size), mean=(0.5,) * 3, std=(0.5,) * 3)
    img = _noise_image()
    tf = DistillTransform(student, teacher)
    crops = set()
    for seed in range(4):
        torch.manual_seed(seed)
        out = tf(img)
        torch.manual_seed(seed)
        own_student = train_transform(student)(img)
        torch.manual_seed(seed)
        own_teacher = train_transform(teacher)(img)
        assert torch.equal(out["images"], own_student)  # the student's view is its own RandomResizedCrop ...
        assert torch.equal(out["teacher_images"], own_teacher)  # ... and the teacher's the same crop, its way
        crops.add(out["images"].sum().item())
    assert len(crops) == 4  # the crop is random


def test_one_transform_when_both_models_preprocess_alike(tmp_path):
    teacher, student = load_model("cc-test-teacher"), load_model("cc-test-student")
    img = _noise_image()
    same = train_transform_for(student, teacher)
    assert isinstance(same(img), torch.Tensor) and same(img).shape == (3, 32, 32)  # decoded and cropped once
    small = load_model(str(_student_json(tmp_path, 24)))
    views = train_transform_for(small, teacher)(img)
    assert views["images"].shape == (3, 24, 24) and views["teacher_images"].shape == (3, 32, 32)
    siglip = _with_preprocess(load_model("cc-test-teacher"), **SIGLIP_LIKE)
    views = train_transform_for(student, siglip)(img)
    raw = views["images"] * torch.tensor(preprocess_of(student).std).view(3, 1, 1)
    raw += torch.tensor(preprocess_of(student).mean).view(3, 1, 1)
    torch.testing.assert_close(views["teacher_images"], (raw - 0.5) / 0.5, atol=1e-5, rtol=0)


def test_eval_uses_the_models_own_preprocess_config(tmp_path):
    from compress.evaluation.run_eval import build_eval_sets

    model = _with_preprocess(load_model("cc-test-student"), **SIGLIP_LIKE)
    # left quarter white, the rest black: squash keeps the white columns, a centre crop would cut them
    img = Image.new("RGB", (64, 32), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 16, 32))
    out = eval_transform_for(model)(img)
    assert out.shape == (3, 32, 32)
    torch.testing.assert_close(out[:, :, :6], torch.ones(3, 32, 6))  # (1 - 0.5) / 0.5, squashed to 8 columns
    torch.testing.assert_close(out[:, :, 10:], -torch.ones(3, 32, 22))
    for name in ("a_class", "b_class"):
        (tmp_path / "zs" / name).mkdir(parents=True)
        Image.new("RGB", (40, 40), (255, 255, 255)).save(tmp_path / "zs" / name / "0.png")
    eval_cfg = EvalConfig(zero_shot=[ZeroShotTaskConfig(name="f", kind="folder", path=str(tmp_path / "zs"))],
                          retrieval=False)
    (task,), _ = build_eval_sets(eval_cfg, None, model, tokenizer_for(model))
    images = next(iter(task.loader))["images"]
    torch.testing.assert_close(images, torch.ones(2, 3, 32, 32))  # white under the model's own mean/std


def test_online_teacher_reads_its_own_view():
    teacher = load_model("cc-test-teacher")
    precision = resolve_precision("fp32", torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    texts = torch.randint(1, 400, (2, 16), generator=g)
    batch = {"images": torch.randn(2, 3, 24, 24, generator=g), "teacher_images": torch.randn(2, 3, 32, 32, generator=g),
             "texts": texts}
    out = OnlineTeacher(teacher, precision)(batch)
    with torch.no_grad():
        ref = clip_forward(teacher, batch["teacher_images"], texts, ())
    torch.testing.assert_close(out.image_features, ref.image_features)


def _run_dict(tmp_path: Path, student: str, **train: object) -> dict:
    return {
        "name": "sizes",
        "teacher": {"model": "cc-test-teacher", "random_init": True},
        "student": {"model": student},
        "inheritance": {"name": "none"},
        "losses": [{"name": "affinity", "weight": 1.0}],
        "data": {"train": {"kind": "synthetic", "num_samples": 64}, "val": {"kind": "synthetic", "num_samples": 32}},
        "train": {"steps": 2, "batch_size": 8, "lr": 1e-3, "log_every": 1, "progress": False, **train},
        "eval": {"zero_shot": [{"name": "cs", "kind": "synthetic", "task": "color_shape"}], "batch_size": 64,
                 "throughput": False},
        "output": {"dir": str(tmp_path / "runs")},
    }


def test_train_batches_carry_the_teachers_view_only_when_needed(tmp_path):
    teacher = load_model("cc-test-teacher")
    small = str(_student_json(tmp_path, 24))
    cfg = config_from_dict(_run_dict(tmp_path, small))
    batches, _ = train_batches(cfg, load_model(small), teacher, torch.device("cpu"))
    batch = next(batches)
    assert batch["images"].shape == (8, 3, 24, 24) and batch["teacher_images"].shape == (8, 3, 32, 32)
    same, _ = train_batches(cfg, load_model("cc-test-student"), teacher, torch.device("cpu"))
    expected = ["captions", "fingerprints", "images", "keys", "texts"]
    assert [sorted(b) for b in itertools.islice(same, 2)] == [expected] * 2


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_student_with_another_image_size_than_the_teacher_trains(tmp_path, accum_steps):
    from compress.run import run_experiment

    cfg = config_from_dict(_run_dict(tmp_path, str(_student_json(tmp_path, 24)), accum_steps=accum_steps))
    row = run_experiment(cfg)
    assert row["status"] == "completed", row.get("error")
    assert row["metrics"]["train/steps"] == 2 and "zs/cs/top1" in row["metrics"]
    exported = load_model(row["metrics"]["export/path"])
    assert preprocess_of(exported).size == (24, 24)  # the student keeps its own size after export


def test_preprocess_of_reads_the_model():
    model = _with_preprocess(load_model("cc-test-student"), **SIGLIP_LIKE)
    cfg = preprocess_of(model)
    assert asdict(cfg) == {**asdict(PreprocessCfg()), **SIGLIP_LIKE, "size": (32, 32)}


def test_a_config_json_with_its_own_preprocess_cfg_is_honoured(tmp_path):
    """An ``open_clip_config.json`` (``{model_cfg, preprocess_cfg}``) keeps its normalisation."""
    path = tmp_path / "open_clip_config.json"
    path.write_text(json.dumps({"model_cfg": get_model_config("cc-test-teacher"), "preprocess_cfg": SIGLIP_LIKE}))
    teacher = load_model(str(path))
    assert asdict(preprocess_of(teacher)) == {**asdict(PreprocessCfg()), **SIGLIP_LIKE, "size": (32, 32)}
    views = train_transform_for(load_model("cc-test-student"), teacher)(Image.new("RGB", (40, 40), (255, 255, 255)))
    torch.testing.assert_close(views["teacher_images"], torch.ones(3, 32, 32))
