"""MobileCLIP's lambda mix as a schedule: L = (1 - lambda(t)) L_CLIP + lambda(t) L_distill, lambda the distillation
term's weight schedule and the CLIP term's weight ``{name: complement, of: weight/affinity}`` (Vasu et al., CVPR
2024). A step at lambda = 0 neither computes the distillation term nor calls the teacher; at lambda = 1 the CLIP
term is not computed."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from compress.config import TrainConfig
from compress.config.errors import ConfigError
from compress.models import load_model
from compress.outputs import ClipOutput
from compress.plan import build_plan
from compress.precision import resolve_precision
from compress.recipe import Recipe, config_from_dict
from compress.registry import SCHEDULES
from compress.teacher import OnlineTeacher
from compress.train import Trainer

FP32 = resolve_precision("fp32", torch.device("cpu"))
RAMP = {"name": "linear_ramp", "start": 0.0, "end": 1.0, "steps": 4}
MIX = {"name": "complement", "of": "weight/affinity"}


def mix_config(lam=RAMP, clip=MIX, steps=6, affinity_weight=1.0, clip_weight=1.0, **more):
    """A tiny run with the MobileCLIP mix: affinity (both directions, each model's own temperature) and CLIP."""
    schedules = {"lr": {"name": "constant"}, **({"weight/affinity": lam} if lam else {}),
                 **({"weight/clip": clip} if clip else {}), **more}
    return config_from_dict({
        "name": "mix",
        "teacher": {"model": "cc-test-teacher", "random_init": True},
        "student": {"model": "cc-test-student"},
        "inheritance": {"name": "manual"},
        "losses": [{"name": "affinity", "scale": "model", "weight": affinity_weight},
                   {"name": "clip", "weight": clip_weight}],
        "schedules": schedules,
        "data": {"train": {"kind": "synthetic", "num_samples": 64}},
        "train": {"steps": steps, "batch_size": 8, "lr": 1e-3},
    })


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return load_model("cc-test-teacher"), load_model("cc-test-student")


def outputs(seed: int, n: int = 8, dim: int = 16) -> ClipOutput:
    g = torch.Generator().manual_seed(seed)
    image, text = (F.normalize(torch.randn(n, dim, generator=g), dim=-1) for _ in range(2))
    return ClipOutput(image_features=image.requires_grad_(), text_features=text.requires_grad_(),
                      logit_scale=torch.tensor(10.0 + seed))


def kl_rows(teacher_logits, student_logits):
    """mean over rows of KL(softmax(teacher) || softmax(student)), written out."""
    log_p = teacher_logits.log_softmax(dim=1)
    return (log_p.exp() * (log_p - student_logits.log_softmax(dim=1))).sum(dim=1).mean()


def entropy_rows(logits):
    log_p = logits.log_softmax(dim=1)
    return -(log_p.exp() * log_p).sum(dim=1).mean()


def mobileclip(student: ClipOutput, teacher: ClipOutput, lam: float):
    """The paper's formula by hand: (1 - lam) InfoNCE + lam * (KL_i2t + KL_t2i) / 2 (each model's own scale),
    and the teacher's entropies (soft cross-entropy = KL + H(teacher), so the value differs by lam * H / 2)."""
    s, t = student, teacher
    logits = s.logit_scale * s.image_features @ s.text_features.T
    labels = torch.arange(logits.shape[0])
    clip = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    teacher_i2t = t.logit_scale * t.image_features @ t.text_features.T
    kl = 0.5 * (kl_rows(teacher_i2t, logits) + kl_rows(teacher_i2t.T, logits.T))
    entropy = 0.5 * (entropy_rows(teacher_i2t) + entropy_rows(teacher_i2t.T))
    return (1 - lam) * clip + lam * kl, lam * entropy.detach()


def trainer_of(cfg, models, teacher_calls=None, clip_calls=None, accum=1, records=None):
    teacher_model, student = models
    student = copy.deepcopy(student)
    terms = Recipe.losses(cfg, student, teacher_model)
    if clip_calls is not None:  # count the CLIP term's computations
        clip = terms[1].module
        plain = clip.forward
        clip.forward = lambda *a, **k: (clip_calls.append(1), plain(*a, **k))[1]
    teacher = OnlineTeacher(teacher_model, FP32)
    if teacher_calls is not None:
        online = teacher
        teacher = lambda batch: (teacher_calls.append(batch["images"].shape[0]), online(batch))[1]  # noqa: E731
    train = TrainConfig(steps=cfg.train.steps, batch_size=8, accum_steps=accum, lr=1e-3, progress=False, log_every=1)
    g = torch.Generator().manual_seed(0)
    size = 8 // accum  # the stream yields micro-batches
    batches = itertools.repeat({"images": torch.randn(size, 3, 32, 32, generator=g),
                                "texts": torch.randint(1, 400, (size, 16), generator=g)})
    return Trainer(train, student, terms, Recipe.schedule(cfg, "lr"), batches, FP32, teacher=teacher,
                   on_log=records.append if records is not None else None)


LAMBDAS = {
    "linear_ramp": (RAMP, [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]),
    "constant": ({"name": "constant", "value": 0.3}, [0.3] * 6),
    "cosine": ({"name": "warmup_cosine"}, [0.5 * (1 + math.cos(math.pi * t / 6)) for t in range(6)]),
}


@pytest.mark.parametrize("kind", LAMBDAS)
def test_the_mixed_loss_is_mobileclips_formula_at_every_step(models, kind):
    """The engine's objective at step t against (1 - lambda(t)) L_CLIP + lambda(t) L_KL written out here: values
    equal up to lambda * H(teacher) / 2, gradients w.r.t. the student's features equal."""
    lam_spec, lambdas = LAMBDAS[kind]
    trainer = trainer_of(mix_config(lam_spec), models)
    assert [t.name for t in trainer.losses] == ["affinity", "clip"]
    teacher = outputs(100)
    for step, lam in enumerate(lambdas):
        weights = [t.weight_at(step) for t in trainer.losses]
        assert weights == pytest.approx([lam, 1 - lam], abs=1e-12)
        student = outputs(step)
        total, _ = trainer._loss(student, teacher.detach(), {}, weights)
        expected, entropy = mobileclip(student, teacher.detach(), lam)
        assert float(total.detach()) == pytest.approx(float((expected + entropy).detach()), rel=1e-5, abs=1e-6)
        got = torch.autograd.grad(total, [student.image_features, student.text_features])
        want = torch.autograd.grad(expected, [student.image_features, student.text_features])
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("accum", [1, 2])
def test_lambda_zero_steps_do_not_call_the_teacher(models, accum):
    """lambda = 0 at steps 0..2 (a ramp after a delay): only the CLIP term runs and the teacher is not called."""
    calls, records = [], []
    lam = {"name": "linear_ramp", "start": 0.0, "end": 1.0, "steps": 2, "delay": 2}
    trainer_of(mix_config(lam, steps=5), models, teacher_calls=calls, accum=accum, records=records).fit()
    assert [r["weight/affinity"] for r in records] == [0.0, 0.0, 0.0, 0.5, 1.0]
    assert [r["weight/clip"] for r in records] == [1.0, 1.0, 1.0, 0.5, 0.0]
    assert calls == [8 // accum] * (2 * accum)  # steps 3 and 4, once per micro-batch
    assert all("loss/affinity_i2t" not in r for r in records[:3])
    assert all("loss/affinity_i2t" in r for r in records[3:])


def test_lambda_one_steps_do_not_compute_the_clip_term(models):
    """lambda reaches 1 at step 2: from there the complement is 0 and the CLIP term is not computed."""
    clip_calls, teacher_calls, records = [], [], []
    lam = {"name": "linear_ramp", "start": 0.0, "end": 1.0, "steps": 2}
    trainer_of(mix_config(lam, steps=5), models, teacher_calls, clip_calls, records=records).fit()
    assert [r["weight/clip"] for r in records] == [1.0, 0.5, 0.0, 0.0, 0.0]
    assert len(clip_calls) == 2 and len(teacher_calls) == 4
    assert all("loss/contrastive" not in r for r in records[2:])


def test_pure_distillation_never_computes_the_clip_term(models):
    """lambda = 1 throughout (the distillation weight written as 1, no schedule of its own): L = L_distill."""
    cfg = mix_config(lam=None, steps=3)
    clip_calls = []
    trainer = trainer_of(cfg, models, clip_calls=clip_calls)
    trainer.fit()
    assert [t.weight_at(s) for s in range(3) for t in trainer.losses] == [1.0, 0.0] * 3 and clip_calls == []


def test_the_complement_scales_by_the_terms_own_weight_and_follows_a_written_weight():
    cfg = mix_config(lam=None, affinity_weight=0.75, clip_weight=2.0)
    schedule = Recipe.schedule(cfg, "weight/clip")
    assert [schedule(t) for t in range(3)] == [0.5, 0.5, 0.5]  # 2 * (1 - 0.75)
    by_index = mix_config(clip={"name": "complement", "of": "weight/0"})
    assert [Recipe.schedule(by_index, "weight/clip")(t) for t in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]


@pytest.mark.parametrize(("lam", "clip", "lr", "message"), [
    (RAMP, {**MIX, "of": "weight/clp"}, None, "of: 'weight/clp' names no loss term's weight"),
    (RAMP, {**MIX, "of": "weight/clip"}, None, "waits on this schedule itself (a cycle)"),
    (RAMP, {**MIX, "of": "weight/1"}, None, "waits on this schedule itself (a cycle)"),
    ({**MIX, "of": "weight/clip"}, MIX, None, "waits on this schedule itself (a cycle)"),
    ({**RAMP, "end": 2.0}, MIX, None, "of: weight/affinity is 1.5 at step 3, outside [0, 1]"),
    (RAMP, None, MIX, "schedules.lr: schedules 'complement': follows a loss term's weight"),
])
def test_a_wrong_complement_is_refused_in_one_line_naming_the_key(lam, clip, lr, message):
    with pytest.raises(ConfigError, match=r"schedules\.(weight/|lr)") as error:
        mix_config(lam, clip, **({"lr": lr} if lr else {}))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_dry_run_shows_lambdas_schedule_and_its_complement():
    lines = build_plan(mix_config()).stages[0].schedules
    assert "weight/affinity (losses[0]): linear_ramp(start=0, end=1, steps=4), base 1; step 0: 0, step 3: 0.75, " \
           "step 5: 1" in lines
    assert "weight/clip (losses[1]): complement(of=weight/affinity), base 1; step 0: 1, step 3: 0.25, step 5: 0" \
           in lines


def test_the_run_id_hashes_of_and_no_engine_value():
    """The resolved spec (what the run id hashes) is ``{name, of}``: weight_of, total_steps, base_value are the
    engine's, so writing the complement never depends on them; the lambda schedule it reads is hashed as its own."""
    assert SCHEDULES.resolved(MIX, ("base_value", "total_steps", "weight_of")) == MIX


def test_a_run_whose_lambda_is_zero_throughout_never_builds_the_teacher_on_the_device(tmp_path, monkeypatch):
    """Not even its compute copy or its views: every teacher-reading term has weight 0 at every step."""
    from compress.run import run_experiment
    from tests.test_run_e2e import tiny_config

    built = []
    monkeypatch.setattr("compress.teacher.compute_copy", lambda *a: built.append(a) or a[0])
    no_eval = {"zero_shot": [], "retrieval": False, "macs": False, "throughput": False}
    cfg = tiny_config(tmp_path, losses=[{"name": "affinity", "weight": 0.0}, {"name": "clip"}], eval=no_eval)
    assert run_experiment(cfg)["status"] == "completed"
    assert not built
    cfg = tiny_config(tmp_path, losses=[{"name": "affinity", "weight": 0.5}, {"name": "clip"}], eval=no_eval,
                      output={"dir": str(tmp_path / "other")})
    assert run_experiment(cfg)["status"] == "completed"
    assert built
