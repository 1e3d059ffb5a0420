"""The training loop's invariants: accumulation equals the full batch, non-finite guard, groups."""

import copy
import itertools

import pytest
import torch

from compress.config import TrainConfig
from compress.models import load_model
from compress.precision import resolve_precision
from compress.registry import LOSSES, SCHEDULES
from compress.teacher import OnlineTeacher
from compress.train import LossTerm, Trainer, TrainingError


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    teacher = load_model("cc-test-teacher")
    student = load_model("cc-test-student")
    return teacher, student


def make_batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.randn(n, 3, 32, 32, generator=g), "texts": torch.randint(1, 400, (n, 16), generator=g)}


def make_trainer(teacher, student, accum=1, losses=None, steps=1, batches=None, **train):
    cfg = TrainConfig(steps=steps, batch_size=16, accum_steps=accum, lr=1e-3, progress=False, **train)
    precision = resolve_precision("fp32", torch.device("cpu"))
    losses = losses or [
        LossTerm("affinity", 1.0, LOSSES.build({"name": "affinity", "scale": "model"})),
        LossTerm("clip", 0.5, LOSSES.build("clip")),
    ]
    lr = SCHEDULES.build("constant", context={"base_value": cfg.lr})
    batches = batches or itertools.repeat(make_batch())
    return Trainer(cfg, student, losses, lr, batches, precision, teacher=OnlineTeacher(teacher, precision))


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_accumulation_equals_full_batch(models):
    teacher, student = models
    batch = make_batch()
    full = make_trainer(teacher, copy.deepcopy(student), accum=1)
    loss_full, terms_full = full._forward_backward(batch, 0)
    accum = make_trainer(teacher, copy.deepcopy(student), accum=4)
    loss_accum, terms_accum = accum._forward_backward(batch, 0)
    assert loss_accum.item() == pytest.approx(loss_full.item(), rel=1e-5)
    for k in terms_full:
        assert terms_accum[k].item() == pytest.approx(terms_full[k].item(), rel=1e-5)
    g_full, g_accum = grads(full.student), grads(accum.student)
    assert g_full.keys() == g_accum.keys()
    assert "logit_scale" in g_full  # the student's own scale is trained (affinity scale=model, clip)
    for name in g_full:
        torch.testing.assert_close(g_accum[name], g_full[name], rtol=1e-4, atol=1e-6, msg=name)


def test_nonfinite_losses_are_skipped_then_abort(models):
    teacher, student = models

    class Exploding(torch.nn.Module):
        needs_teacher, needs = False, ()

        def forward(self, s, t, batch=None):
            return {"boom": s.image_features.sum() * float("nan")}

    before = copy.deepcopy(student.state_dict())
    trainer = make_trainer(teacher, copy.deepcopy(student), losses=[LossTerm("x", 1.0, Exploding())], steps=5,
                           max_nonfinite_in_row=3)
    with pytest.raises(TrainingError, match="not finite for 3 steps in a row"):
        trainer.fit()
    after = trainer.student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no step was taken


def test_weight_decay_groups(models):
    teacher, student = models
    trainer = make_trainer(teacher, copy.deepcopy(student))
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    names = {id(p): n for n, p in trainer.student.named_parameters()}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.2
    assert "logit_scale" in no_decay and "visual.class_embedding" in no_decay
    assert all(n.endswith("bias") or "ln" in n or "logit" in n or "class_embedding" in n for n in no_decay)
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in decay
    assert "token_embedding.weight" in decay


def test_fit_trains_and_logs(models, tmp_path):
    teacher, student = models
    stream = (make_batch(seed=i) for i in itertools.count())
    trainer = make_trainer(teacher, copy.deepcopy(student), steps=4, batches=stream, log_every=2)
    trainer.run_dir = tmp_path
    summary = trainer.fit()
    assert summary.steps == 4 and summary.nonfinite_steps == 0
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3  # steps 1, 2, 4
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
    pairs = zip(trainer.student.parameters(), student.parameters(), strict=True)
    assert any(not torch.equal(p, q) for p, q in pairs)
