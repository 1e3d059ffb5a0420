"""Teacher ensembles (issue 18, item 2): ``teachers:`` with several models, each on its own view, tokens and logit
scale; the affinity loss against the ensemble (MobileCLIP2's average of the teachers' probabilities), checked
against formulas written here in plain torch."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from compress.config.errors import ConfigError
from compress.data.collate import stack_images
from compress.data.transforms import CropViews, train_transform_for
from compress.models import load_model
from compress.models.factory import get_model_config
from compress.models.forward import tokenizer_for
from compress.outputs import ClipOutput
from compress.precision import resolve_precision
from compress.recipe import config_from_dict, run_id_of
from compress.registry import LOSSES
from compress.teacher import OnlineTeacher

#: a 32 px teacher (embedding 32) and a 48 px one (embedding 24): different sizes, views and embedding sizes
SMALL, LARGE = "cc-test-teacher", "cc-test-teacher-48px"
TEACHERS = [{"model": SMALL, "random_init": True}, {"model": LARGE, "random_init": True}]


def _run_dict(tmp_path: Path, **changes) -> dict:
    data = {
        "name": "ensemble",
        "teachers": TEACHERS,
        "student": {"model": "cc-test-student"},
        "inheritance": {"name": "manual"},
        "losses": [{"name": "affinity", "scale": "model", "teacher_weights": [1, 3]}],
        "data": {"train": {"kind": "synthetic", "num_samples": 32}},
        "train": {"steps": 2, "batch_size": 8, "lr": 1e-3, "log_every": 1, "progress": False},
        "eval": {"zero_shot": [], "retrieval": False, "macs": False, "throughput": False},
        "output": {"dir": str(tmp_path / "runs")},
    }
    data.update(changes)
    return data


# -- the loss against independent formulas ------------------------------------------------------------------------
def _ce(p: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()


def _expected(student, teachers, weights, mode: str, scale=None):
    """Plain torch: the ensemble's targets and the student's soft cross-entropy, both directions (weights 0.5)."""
    a = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    si, st, ss = student
    s_student = ss if scale is None else scale
    out = {}
    for name, rows, cols in (("i2t", 0, 1), ("t2i", 1, 0)):
        logits = [(t[2] if scale is None else scale) * t[rows] @ t[cols].T for t in teachers]
        if mode == "mean_probs":
            target = sum(a[k] * torch.softmax(logits[k], dim=1) for k in range(len(teachers)))
        else:
            target = torch.softmax(sum(a[k] * logits[k] for k in range(len(teachers))), dim=1)
        mine = s_student * (si if rows == 0 else st) @ (st if rows == 0 else si).T
        out[f"affinity_{name}"] = 0.5 * _ce(target, mine)
        for k in range(len(teachers)):
            out[f"affinity_{name}/teacher{k}"] = 0.5 * _ce(torch.softmax(logits[k], dim=1), mine)
    return out


def _features(n: int, dim: int, scale: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1)
    text = F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1)
    return image, text, torch.tensor(scale, dtype=torch.float64)


def _output(features) -> ClipOutput:
    return ClipOutput(image_features=features[0], text_features=features[1], logit_scale=features[2])


@pytest.mark.parametrize("mode", ["mean_probs", "mean_logits"])
@pytest.mark.parametrize("scale", ["model", 20.0])
def test_the_ensemble_affinity_equals_an_independent_formula(mode, scale):
    """Two teachers with other embedding sizes (24, 40) than the student's (16) and other logit scales (100, 30),
    weights 1:3: the loss, its per-teacher breakdown and the student's gradients equal the formula's."""
    student = _features(6, 16, 50.0, 0)
    teachers = [_features(6, 24, 100.0, 1), _features(6, 40, 30.0, 2)]
    loss = LOSSES.build({"name": "affinity", "scale": scale, "ensemble": mode, "teacher_weights": [1, 3]},
                        context={"teacher_count": 2})
    leaves = [t.clone().requires_grad_() for t in student[:2]]
    out = loss(ClipOutput(leaves[0], leaves[1], student[2]),
               ClipOutput.of_members([_output(t) for t in teachers]))
    fixed = None if scale == "model" else scale
    expected_leaves = [t.clone().requires_grad_() for t in student[:2]]
    expected = _expected((*expected_leaves, student[2]), teachers, [1, 3], mode, fixed)
    assert sorted(out) == sorted(expected)
    for key, value in expected.items():
        assert float(out[key].detach()) == pytest.approx(float(value.detach()), rel=1e-12, abs=1e-12), key
    assert not any(out[k].requires_grad for k in out if "/" in k)  # a breakdown is logged, not differentiated
    (out["affinity_i2t"] + out["affinity_t2i"]).backward()
    (expected["affinity_i2t"] + expected["affinity_t2i"]).backward()
    for got, want in zip(leaves, expected_leaves, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-12)
    if mode == "mean_probs":  # the weighted sum of the per-teacher terms is the same loss (CE is linear in p)
        summed = (out["affinity_i2t/teacher0"] + 3 * out["affinity_i2t/teacher1"]) / 4
        assert float(summed) == pytest.approx(float(out["affinity_i2t"].detach()), rel=1e-12)


def test_with_one_teacher_the_affinity_is_tinyclips_bit_for_bit():
    student, teacher = _features(5, 16, 50.0, 3), _features(5, 32, 80.0, 4)
    loss = LOSSES.build({"name": "affinity", "scale": "model"}, context={"teacher_count": 1})
    out = loss(_output(student), _output(teacher))
    assert sorted(out) == ["affinity_i2t", "affinity_t2i"]
    p = torch.softmax(teacher[2] * teacher[0] @ teacher[1].T, dim=1)
    expected = 0.5 * -(p * torch.log_softmax(student[2] * student[0] @ student[1].T, dim=1)).sum(dim=1).mean()
    assert torch.equal(out["affinity_i2t"], expected)


def test_the_loss_refuses_an_output_with_another_number_of_teachers():
    loss = LOSSES.build({"name": "affinity"}, context={"teacher_count": 2})
    with pytest.raises(ValueError, match="built for 2 teacher"):
        loss(_output(_features(4, 16, 50.0, 0)), _output(_features(4, 16, 50.0, 1)))


# -- ClipOutput.members -----------------------------------------------------------------------------------------
def test_clip_output_cat_detach_and_to_keep_the_members():
    parts = []
    for seed in (0, 1):
        members = [_output(_features(3, 8, 10.0, seed)), _output(_features(3, 12, 20.0, seed + 10))]
        parts.append(ClipOutput.of_members(members))
    both = ClipOutput.cat(parts)
    assert both.members is not None and len(both.members) == 2
    for k in range(2):
        torch.testing.assert_close(both.members[k].image_features,
                                   torch.cat([p.members[k].image_features for p in parts]))
        assert both.members[k].logit_scale is parts[0].members[k].logit_scale
    assert both.image_features is both.members[0].image_features  # its own fields are member 0's
    assert both.members[1].text_features.shape == (6, 12)
    for moved in (both.detach(), both.to("cpu")):
        assert [m.image_features.shape for m in moved.members] == [(6, 8), (6, 12)]
        assert moved.text_features is moved.members[0].text_features
    assert ClipOutput.of_members([parts[0].members[0]]) is parts[0].members[0]  # one model: no members
    with pytest.raises(ValueError, match="ensembles"):
        ClipOutput.cat([parts[0], parts[0].members[0]])
    assert both.ensemble == both.members and parts[0].members[0].ensemble == [parts[0].members[0]]


# -- config -----------------------------------------------------------------------------------------------------
def test_teacher_is_the_first_of_the_teachers(tmp_path):
    cfg = config_from_dict(_run_dict(tmp_path))
    assert cfg.teacher.model == SMALL and [t.model for t in cfg.teachers] == [SMALL, LARGE]
    same = config_from_dict(_run_dict(tmp_path, teacher=TEACHERS[0]))  # written out, equal: accepted
    assert run_id_of(same) == run_id_of(cfg)
    assert run_id_of(config_from_dict(_run_dict(tmp_path, teachers=TEACHERS[::-1]))) != run_id_of(cfg)


def test_a_further_teachers_local_file_enters_the_run_id_and_an_override_of_teacher_is_refused(tmp_path):
    path = tmp_path / "large.json"
    path.write_text(json.dumps(get_model_config(LARGE)))
    teachers = [TEACHERS[0], {"model": str(path), "random_init": True}]
    before = run_id_of(config_from_dict(_run_dict(tmp_path, teachers=teachers)))
    path.write_text(json.dumps({**get_model_config(LARGE), "embed_dim": 16}))
    os.utime(path, ns=(10**9, 10**9))
    assert run_id_of(config_from_dict(_run_dict(tmp_path, teachers=teachers))) != before
    with pytest.raises(ConfigError, match="--set teacher.model=cc-test-teacher-48px: teacher: with teachers"):
        config_from_dict(_run_dict(tmp_path), [f"teacher.model={LARGE}"])


@pytest.mark.parametrize(("changes", "message"), [
    ({"teacher": {"model": LARGE, "random_init": True}}, "teacher: with teachers, teacher is teachers[0]"),
    ({"teachers": TEACHERS[:1]}, "teachers: an ensemble needs at least two models"),
    ({"losses": [{"name": "feature_distill"}]},
     "losses[0]: loss 'feature_distill' does not read a teacher ensemble"),
    ({"losses": [{"name": "affinity", "teacher_weights": [1, 2, 3]}]}, "3 weights for 2 teacher"),
    ({"losses": [{"name": "affinity", "ensemble": "sum_terms"}]}, "equals 'mean_probs' exactly"),
    ({"teachers": [TEACHERS[0], {"model": LARGE}]}, "teachers[1].model: 'cc-test-teacher-48px' has no weights"),
])
def test_a_wrong_ensemble_is_refused_with_one_line_naming_the_key(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=None) as caught:
        config_from_dict(_run_dict(tmp_path, **changes))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_one_teacher_settings_of_the_ensemble_are_refused_and_defaults_keep_the_run_id(tmp_path):
    one = {"teachers": [], "teacher": TEACHERS[0]}
    with pytest.raises(ConfigError, match="this run has one teacher"):
        config_from_dict(_run_dict(tmp_path, **one, losses=[{"name": "affinity", "ensemble": "mean_logits"}]))
    with pytest.raises(ConfigError, match="teacher_weights"):
        config_from_dict(_run_dict(tmp_path, **one, losses=[{"name": "affinity", "teacher_weights": [1]}]))
    plain = config_from_dict(_run_dict(tmp_path, **one, losses=[{"name": "affinity"}]))
    written = config_from_dict(_run_dict(tmp_path, **one, losses=[{"name": "affinity", "ensemble": "mean_probs"}]))
    assert run_id_of(plain) == run_id_of(written)
    from compress.recipe.identity import identity_dict

    assert set(identity_dict(plain)["losses"][0]) == {"name", "weight_i2t", "weight_t2i", "scale", "weight"}
    assert "teachers" not in identity_dict(plain)


# -- views and tokens -------------------------------------------------------------------------------------------
def _image(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (40, 50, 3), generator=g, dtype=torch.uint8).numpy())


def _large_with_other_tokens(tmp_path: Path) -> Path:
    cfg = get_model_config(LARGE)
    cfg["text_cfg"]["context_length"] = 24  # another tokenizer than the student's (context 16)
    path = tmp_path / "large-24-tokens.json"
    path.write_text(json.dumps(cfg))
    return path


def test_each_member_runs_on_its_own_view_and_tokens(tmp_path):
    """Teacher 0 shares the student's view and tokens (``images``, ``texts``); teacher 1 reads ``teacher_images/1``
    (48 px) and its own tokenizer's ids of the captions (context 24): its output is its model's on those."""
    torch.manual_seed(0)
    student, small, large = (load_model("cc-test-student"), load_model(SMALL),
                             load_model(str(_large_with_other_tokens(tmp_path))))
    with torch.no_grad():
        large.logit_scale.fill_(math.log(30.0))
    transform = train_transform_for(student, [small, large])
    assert isinstance(transform, CropViews) and list(transform.views) == ["images", "teacher_images/1"]
    captions = ["a red square", "a blue circle", "a green triangle"]
    batch = stack_images([transform(_image(i)) for i in range(3)])
    assert batch["images"].shape[-1] == 32 and batch["teacher_images/1"].shape[-1] == 48
    batch.update(texts=tokenizer_for(student)(captions), captions=captions)
    teacher = OnlineTeacher([small, large], resolve_precision("fp32", torch.device("cpu")), student=student)
    out = teacher(batch)
    assert out.members is not None and len(out.members) == 2
    with torch.no_grad():
        for model, images, texts, member in ((small, batch["images"], batch["texts"], out.members[0]),
                                             (large, batch["teacher_images/1"], tokenizer_for(large)(captions),
                                              out.members[1])):
            assert texts.shape[1] == (16 if model is small else 24)
            torch.testing.assert_close(member.image_features, F.normalize(model.encode_image(images), dim=-1))
            torch.testing.assert_close(member.text_features, F.normalize(model.encode_text(texts), dim=-1))
            torch.testing.assert_close(member.logit_scale, model.logit_scale.exp())
    assert float(out.members[1].logit_scale) == pytest.approx(30.0)
    one = OnlineTeacher(small, resolve_precision("fp32", torch.device("cpu")))(batch)  # one teacher: as before
    assert one.members is None


def test_a_single_teacher_keeps_its_transform(tmp_path):
    student, small, large = load_model("cc-test-student"), load_model(SMALL), load_model(LARGE)
    assert not isinstance(train_transform_for(student, small), CropViews)  # one view serves both
    assert list(train_transform_for(student, large).views) == ["images", "teacher_images"]
    assert list(train_transform_for(student, [large, small]).views) == ["images", "teacher_images"]


# -- a run ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("accum_steps", [1, 2])
def test_a_run_with_two_teachers_of_different_image_sizes_trains_and_writes_its_row(tmp_path, accum_steps):
    """The plan lists both teachers; the run trains (micro-batches of the step concatenated member by member with
    accumulation) and its row and log carry the per-teacher terms, which the objective does not add."""
    from compress.plan import build_plan, format_plan
    from compress.recipe import run_dir_for
    from compress.run import run_experiment

    train = {**_run_dict(tmp_path)["train"], "accum_steps": accum_steps}
    cfg = config_from_dict(_run_dict(tmp_path, train=train))
    text = format_plan(build_plan(cfg))
    assert "teachers[0]    cc-test-teacher" in text and "teachers[1]    cc-test-teacher-48px" in text
    row = run_experiment(cfg)
    assert row["status"] == "completed", row.get("error")
    assert {"train/affinity_i2t/teacher0", "train/affinity_i2t/teacher1", "train/affinity_t2i/teacher1"} <= set(
        row["metrics"])
    lines = [json.loads(x) for x in (run_dir_for(cfg) / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for line in lines:  # the objective is the two terms; the per-teacher breakdown is not added
        assert line["loss"] == pytest.approx(line["loss/affinity_i2t"] + line["loss/affinity_t2i"], rel=1e-5)
        weighted = (line["loss/affinity_i2t/teacher0"] + 3 * line["loss/affinity_i2t/teacher1"]) / 4
        assert weighted == pytest.approx(line["loss/affinity_i2t"], rel=1e-5)


def test_fixed_views_of_the_teacher_cache_online_give_each_member_its_view(tmp_path):
    """``teacher_cache.mode: online`` (fixed views, the teachers run online): member 1 reads its own 48 px view of the
    same fixed crop, and the run trains."""
    from compress.data.pipeline import train_batches
    from compress.run import run_experiment

    cfg = config_from_dict(_run_dict(tmp_path, teacher_cache={"mode": "online", "num_augmentations": 2}))
    student = load_model("cc-test-student")
    batch = next(train_batches(cfg, student, [load_model(SMALL), load_model(LARGE)], torch.device("cpu"))[0])
    assert batch["images"].shape[-1] == 32 and batch["teacher_images/1"].shape[-1] == 48
    assert "teacher_images" not in batch and "aug_ids" in batch
    row = run_experiment(cfg)
    assert row["status"] == "completed", row.get("error")
    assert "train/affinity_t2i/teacher1" in row["metrics"]


def test_the_memory_estimate_counts_every_teacher(tmp_path):
    """Each member's weights (compute precision) and features, its teacher half of the affinity matrices, and on the
    host its own view where its size differs from the student's."""
    from compress.memory import estimate_device_memory, estimate_host_memory, shape_of_model

    cfg = config_from_dict(_run_dict(tmp_path))
    student, small, large = (shape_of_model(load_model(n)) for n in ("cc-test-student", SMALL, LARGE))
    one = estimate_device_memory(cfg, student, small, world_size=1, precision="bf16")
    both = estimate_device_memory(cfg, student, [small, large], world_size=1, precision="bf16")
    assert both.weights - one.weights == 2 * large.parameters
    assert (one.similarity_matrices, both.similarity_matrices) == (6, 6)  # the config's: two teachers
    assert both.features == one.features * 3 // 2  # three models' features instead of two
    host_one = estimate_host_memory(cfg, student, small, world_size=1)
    host_both = estimate_host_memory(cfg, student, [small, large], world_size=1)
    assert host_both.bytes_per_sample - host_one.bytes_per_sample == 3 * 48 * 48 * 4
    single = config_from_dict(_run_dict(tmp_path, teachers=[], teacher=TEACHERS[0], losses=[{"name": "affinity"}]))
    assert estimate_device_memory(single, student, small, world_size=1).similarity_matrices == 4


def test_a_member_with_its_own_tokenizer_gets_its_ids_from_the_loaders_workers(tmp_path, monkeypatch):
    """Member 1 (context 24, the student's 16) finds its token ids in the batch (``teacher/texts/1``, made by the
    collate), the online teacher does not tokenize in the training process, and the run trains."""
    from compress.data.pipeline import train_batches
    from compress.run import run_experiment
    from compress.step_inputs import step_batch

    other = str(_large_with_other_tokens(tmp_path))
    cfg = config_from_dict(_run_dict(tmp_path, teachers=[TEACHERS[0], {"model": other, "random_init": True}]))
    student = load_model("cc-test-student")
    batch = next(train_batches(cfg, student, [load_model(SMALL), load_model(other)], torch.device("cpu"))[0])
    assert batch["texts"].shape == (8, 16) and batch["teacher/texts/1"].shape == (8, 24)
    assert "teacher/texts/0" not in batch and "teacher/texts/1" not in step_batch([batch], torch.device("cpu"))
    calls = []
    original = OnlineTeacher._texts
    monkeypatch.setattr(OnlineTeacher, "_texts", lambda self, k, b: calls.append((k, self.token_keys[k] in b))
                        or original(self, k, b))
    row = run_experiment(cfg)
    assert row["status"] == "completed", row.get("error")
    assert sorted(set(calls)) == [(0, False), (1, True)]  # member 0 reads the student's ids


def test_a_term_named_as_a_breakdown_but_carrying_a_gradient_is_refused():
    """``name/part`` marks a term logged and not added; one with a gradient would silently not be learnt from."""
    from compress.train import LossTerm, Trainer, TrainingError

    class Misnamed(torch.nn.Module):
        needs: tuple = ()
        needs_teacher = False

        def forward(self, student, teacher, batch):
            return {"mine/part": student.image_features.sum()}

    trainer = Trainer.__new__(Trainer)
    trainer.losses = [LossTerm("mine", 1.0, Misnamed())]
    student = ClipOutput(torch.randn(2, 4, requires_grad=True), torch.randn(2, 4), torch.tensor(1.0))
    with pytest.raises(TrainingError, match="'mine/part' with a gradient"):
        trainer._loss(student, None, {}, [1.0])


def test_fixed_teacher_scales_replace_each_teachers_own_and_leave_the_students():
    """MobileCLIP2's distillation scales (70 and 60 here) for the teachers, the student's own learnable scale: the
    formula with those teacher scales; a wrong count or a scale <= 0 is refused."""
    student = _features(6, 16, 50.0, 0)
    teachers = [_features(6, 24, 100.0, 1), _features(6, 40, 30.0, 2)]
    loss = LOSSES.build({"name": "affinity", "scale": "model", "teacher_scales": [70, 60]},
                        context={"teacher_count": 2})
    out = loss(_output(student), ClipOutput.of_members([_output(t) for t in teachers]))
    fixed = [(t[0], t[1], torch.tensor(s, dtype=torch.float64)) for t, s in zip(teachers, (70.0, 60.0), strict=True)]
    expected = _expected(student, fixed, [1, 1], "mean_probs")
    for key in ("affinity_i2t", "affinity_t2i"):
        assert float(out[key]) == pytest.approx(float(expected[key]), rel=1e-12), key
    for bad, message in (([70], "1 scales for 2 teacher"), ([70, 0], "finite number > 0")):
        with pytest.raises(ValueError, match=message):
            LOSSES.build({"name": "affinity", "teacher_scales": bad}, context={"teacher_count": 2})
