"""The training loop's invariants: accumulation equals the full batch (student, loss-owned
parameters, masks and multipliers), the non-finite guard (objective, regulariser, gradients,
fp16 scaler), zero-weight and scheduled loss terms, the logit-scale clamp, groups, logging."""

from __future__ import annotations

import contextlib
import copy
import itertools
import math

import pytest
import torch
from torch import nn

from compress.config import TrainConfig
from compress.masks import get_masks
from compress.models import load_model
from compress.plugins import Inheritance
from compress.precision import Precision, resolve_precision
from compress.registry import INHERITANCE, LOSSES, SCHEDULES
from compress.teacher import OnlineTeacher
from compress.train import LOGIT_SCALE_MAX, LossTerm, Trainer
from compress.training_error import TrainingError


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    teacher = load_model("cc-test-teacher")
    student = load_model("cc-test-student")
    return teacher, student


class CpuScaledPrecision(Precision):
    """fp16's gradient-scaler logic on the CPU, without autocast (CPU fp16 kernels are not needed
    to exercise the scaler: unscale, inf checks, skipped steps, back-off)."""

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler("cpu", init_scale=2.0**10)


FP32 = resolve_precision("fp32", torch.device("cpu"))
SCALED = CpuScaledPrecision("fp16", torch.device("cpu"))
#: torch.amp.GradScaler (device-generic, so usable on the CPU) exists from torch 2.3 on
needs_cpu_scaler = pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"), reason="no torch.amp.GradScaler")


def make_batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.randn(n, 3, 32, 32, generator=g), "texts": torch.randint(1, 400, (n, 16), generator=g)}


def default_losses():
    return [
        LossTerm("affinity", 1.0, LOSSES.build({"name": "affinity", "scale": "model"})),
        LossTerm("clip", 0.5, LOSSES.build("clip")),
    ]


def make_trainer(teacher, student, accum=1, losses=None, steps=1, batches=None, precision=FP32, inheritance=None,
                 on_log=None, **train):
    cfg = TrainConfig(steps=steps, batch_size=16, accum_steps=accum, lr=1e-3, progress=False, **train)
    lr = SCHEDULES.build("constant", context={"base_value": cfg.lr})
    batches = batches or itertools.repeat(make_batch())
    return Trainer(cfg, student, losses or default_losses(), lr, batches, precision,
                   teacher=OnlineTeacher(teacher, precision), inheritance=inheritance, on_log=on_log)


def all_grads(trainer):
    """Gradients of every trained parameter: the student's (with masks and multipliers) and the losses'."""
    named = [(f"student.{n}", p) for n, p in trainer.student.named_parameters()]
    for i, term in enumerate(trainer.losses):
        named += [(f"loss{i}.{n}", p) for n, p in term.module.named_parameters()]
    return {n: p.grad.clone() for n, p in named if p.grad is not None}


def feature_distill_with_projector():
    """The real feature_distill loss with a learnable projector (the test models share an embed size)."""
    loss = LOSSES.build("feature_distill")
    torch.manual_seed(1)
    loss.projectors = nn.ModuleDict({m: nn.Linear(32, 32, bias=False) for m in ("image", "text")})
    return loss


@pytest.mark.parametrize("student_kind", ["manual", "auto"])
def test_gradient_accumulation_equals_full_batch(models, student_kind):
    """With accum_steps=K the objective and the gradient of every trained parameter equal the
    full-batch ones: the loss-owned projector is counted once, masks use one gate sample per step."""
    teacher, student = models
    inheritance = None
    if student_kind == "auto":
        inheritance = INHERITANCE.build({"name": "auto", "lagrangian": "one_sided", "ramp_steps": 10})
        student = inheritance.inherit(None, teacher)
    losses = default_losses() + [LossTerm("feature_distill", 2.0, feature_distill_with_projector())]
    batch = make_batch()
    results = {}
    for accum in (1, 4):
        trainer = make_trainer(teacher, copy.deepcopy(student), accum=accum, losses=copy.deepcopy(losses),
                               inheritance=inheritance)
        trainer.student.train()
        torch.manual_seed(7)  # the same gate sample in both runs
        loss, terms = trainer._forward_backward(batch, 20)
        results[accum] = loss, terms, all_grads(trainer)
    (loss_full, terms_full, g_full), (loss_accum, terms_accum, g_accum) = results[1], results[4]
    assert loss_accum.item() == pytest.approx(loss_full.item(), rel=1e-5)
    assert terms_accum.keys() == terms_full.keys()
    for k in terms_full:
        assert terms_accum[k].item() == pytest.approx(terms_full[k].item(), rel=1e-5, abs=1e-7), k
    assert g_full.keys() == g_accum.keys()
    assert "student.logit_scale" in g_full  # the student's own scale is trained (affinity scale=model, clip)
    assert {"loss2.projectors.image.weight", "loss2.projectors.text.weight"} <= g_full.keys()
    if student_kind == "auto":
        assert "lagrangian" in terms_full
        masks = [n for n in g_full if ".log_alpha" in n]
        lambdas = [n for n in g_full if ".lambda_" in n]
        assert len(masks) == 6 and len(lambdas) == 2  # channels, heads, neurons per tower; lambda_1, lambda_2
        assert all(g_full[n].abs().sum() > 0 for n in masks + lambdas)
    for name in g_full:
        torch.testing.assert_close(g_accum[name], g_full[name], rtol=1e-4, atol=1e-6, msg=name)


class Scripted(nn.Module):
    """Affinity (scale=model) plus an extra term on chosen calls: ``inf`` (a non-finite loss) or
    ``nan_grad`` (sqrt at 0: a finite value 0 whose gradient is NaN). Counts its calls."""

    needs_teacher, needs = True, ()

    def __init__(self, bad_calls=(), kind="inf"):
        super().__init__()
        self.inner = LOSSES.build({"name": "affinity", "scale": "model"})
        self.bad_calls, self.kind, self.calls = set(bad_calls), kind, 0

    def forward(self, s, t, batch=None):
        terms = self.inner(s, t, batch)
        if self.calls in self.bad_calls:
            f = s.image_features
            extra = f.sum() * float("inf") if self.kind == "inf" else torch.sqrt((f - f.detach()).square().sum())
            terms["extra"] = extra
        self.calls += 1
        return terms


def states_close(a, b):
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)


@pytest.mark.parametrize(("kind", "precision"), [
    pytest.param("inf", SCALED, marks=needs_cpu_scaler),
    pytest.param("nan_grad", SCALED, marks=needs_cpu_scaler),
    ("nan_grad", FP32),
])
def test_nonfinite_step_is_skipped_and_training_continues(models, kind, precision):
    """A step with a non-finite loss, or a finite loss with non-finite gradients, changes nothing
    (weights, optimizer state); with fp16's scaler the scale backs off. Then training goes on:
    [bad, good] ends where [good] alone does."""
    teacher, student = models
    trainer = make_trainer(teacher, copy.deepcopy(student), steps=2, precision=precision,
                           losses=[LossTerm("affinity", 1.0, Scripted({0}, kind))])
    summary = trainer.fit()
    reference = make_trainer(teacher, copy.deepcopy(student), steps=1, losses=[LossTerm("affinity", 1.0, Scripted())])
    reference.fit()
    assert summary.nonfinite_steps == 1
    if precision is SCALED:
        assert trainer.scaler.get_scale() == 2.0**10 * 0.5
    states_close(trainer.student.state_dict(), reference.student.state_dict())
    assert not torch.equal(trainer.student.visual.proj, student.visual.proj)  # the good step was taken


@needs_cpu_scaler
def test_scaled_step_equals_unscaled_step(models):
    teacher, student = models
    scaled = make_trainer(teacher, copy.deepcopy(student), steps=2, precision=SCALED)
    plain = make_trainer(teacher, copy.deepcopy(student), steps=2)
    assert scaled.fit().nonfinite_steps == 0 and plain.fit().nonfinite_steps == 0
    assert scaled.scaler.get_scale() == 2.0**10
    states_close(scaled.student.state_dict(), plain.student.state_dict())


def test_nonfinite_regulariser_is_skipped(models):
    """The guard checks the objective with the strategy's regulariser, not only the loss terms."""
    teacher, student = models

    class BadRegulariser(Inheritance):
        def regularizer(self, student, step):
            return {"bad": student.logit_scale * 0.0 + float("inf")}  # gradient 0, value inf

    before = copy.deepcopy(student.state_dict())
    trainer = make_trainer(teacher, copy.deepcopy(student), steps=1, inheritance=BadRegulariser())
    assert trainer.fit().nonfinite_steps == 1
    after = trainer.student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


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


class Poison(nn.Module):
    """A loss whose value is inf; counts its calls."""

    needs_teacher, needs = False, ()

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, s, t, batch=None):
        self.calls += 1
        return {"poison": s.image_features.sum() * float("inf")}


def test_zero_weight_term_is_not_computed(models):
    """weight 0: the term is not run (no forward, no all-gathers), so 0 * inf cannot poison the total."""
    teacher, student = models
    poison = Poison()
    losses = [LossTerm("affinity", 1.0, LOSSES.build("affinity")), LossTerm("poison", 0.0, poison)]
    reference = make_trainer(teacher, copy.deepcopy(student), steps=2, losses=[losses[0]])
    reference.fit()
    trainer = make_trainer(teacher, copy.deepcopy(student), steps=2, losses=losses)
    assert trainer.fit().nonfinite_steps == 0
    assert poison.calls == 0
    states_close(trainer.student.state_dict(), reference.student.state_dict())


def test_scheduled_weight_sets_the_term_weight_every_step(models):
    """schedules.weight/<loss>: the weight at step t is the schedule's value, logged as weight/<loss>;
    the term runs only at steps where its weight is not 0."""
    teacher, student = models
    records = []
    ramp = SCHEDULES.build({"name": "linear_ramp", "start": 0.0, "end": 1.0, "steps": 2})
    affinity = LossTerm("affinity", 1.0, LOSSES.build("affinity"))
    trainer = make_trainer(teacher, copy.deepcopy(student), steps=3, log_every=1, on_log=records.append,
                           losses=[affinity, LossTerm("clip", 0.5, LOSSES.build("clip"), ramp)])
    trainer.fit()
    assert [r["weight/clip"] for r in records] == [0.0, 0.5, 1.0]
    assert "loss/contrastive" not in records[0] and "weight/affinity" not in records[0]
    for r in records:
        expected = r["loss/affinity_i2t"] + r["loss/affinity_t2i"] + r["weight/clip"] * r.get("loss/contrastive", 0.0)
        assert r["loss"] == pytest.approx(expected, rel=1e-6)
    assert records[2]["loss/contrastive"] > 0


@pytest.mark.parametrize(("start", "clamped"), [(10.0, LOGIT_SCALE_MAX), (-1.0, 0.0)])
def test_logit_scale_is_clamped_after_every_step(models, start, clamped):
    """open_clip / TinyCLIP: logit_scale.clamp_(0, ln 100) after each optimizer step."""
    teacher, student = models
    student = copy.deepcopy(student)
    with torch.no_grad():
        student.logit_scale.fill_(start)
    trainer = make_trainer(teacher, student, steps=1)
    trainer.fit()
    assert LOGIT_SCALE_MAX == pytest.approx(math.log(100))
    assert trainer.student.logit_scale.item() == pytest.approx(clamped, abs=1e-6)


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
    import json

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 4]
    for r in records:  # the logged objective is the weighted sum of the logged terms
        expected = r["loss/affinity_i2t"] + r["loss/affinity_t2i"] + 0.5 * r["loss/contrastive"]
        assert r["loss"] == pytest.approx(expected, rel=1e-6)
        assert r["grad_norm"] > 0 and r["nonfinite_steps"] == 0
    assert summary.final_terms == {k[5:]: v for k, v in records[-1].items() if k.startswith("loss/")}
    assert not torch.equal(trainer.student.visual.proj, student.visual.proj)


def test_masks_see_one_gate_sample_per_step(models):
    """Every forward pass of one step (cached and live, accumulation) uses the same gate sample."""
    teacher, _ = models
    strategy = INHERITANCE.build({"name": "auto"})
    student = strategy.inherit(None, teacher).train()
    seen = []
    gates = get_masks(student).towers["vision"].heads
    with torch.no_grad():
        gates.log_alpha.zero_()  # keep probability ~0.6: samples vary
    original = gates.sample

    def recording():
        value = original()
        seen.append(value.detach().clone())
        return value

    gates.sample = recording
    trainer = make_trainer(teacher, student, accum=4, inheritance=strategy)
    trainer._forward_backward(make_batch(), 0)
    assert len(seen) == 8  # 4 cached + 4 live passes
    assert all(torch.equal(s, seen[0]) for s in seen)
    assert len(set(seen[0].tolist())) > 2  # a real sample (values other than 0 and 1), not the deterministic mask


def test_grad_checkpointing_reaches_the_student_and_its_pruned_replacement(models):
    teacher, _ = models
    auto = INHERITANCE.build({"name": "auto", "target_sparsity": 0.3, "prune_step": 2, "ramp_steps": 1})
    student = auto.inherit(None, copy.deepcopy(teacher))
    trainer = make_trainer(teacher, student, steps=3, inheritance=auto, grad_checkpointing=True)
    towers = lambda m: (m.visual.transformer, m.transformer)  # noqa: E731
    assert all(t.grad_checkpointing for t in towers(trainer.student))
    assert trainer.fit().replaced_at == [2]  # pruned at step 2 and swapped in
    assert all(t.grad_checkpointing for t in towers(trainer.student))


def test_grad_checkpointing_on_a_student_without_it_is_refused(models):
    teacher, student = models

    class Bare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = copy.deepcopy(student)

    with pytest.raises(TrainingError, match="grad_checkpointing"):
        make_trainer(teacher, Bare(), grad_checkpointing=True)


def test_checkpoints_every_k_steps_and_at_the_end(models):
    teacher, student = models
    trainer = make_trainer(teacher, copy.deepcopy(student), steps=5, checkpoint_every=2)
    saved = []
    trainer.on_checkpoint = lambda t: saved.append((t.step, t.state_dict()["step"], t.state_dict()["samples"]))
    trainer.fit()
    assert saved == [(2, 2, 2 * 16), (4, 4, 4 * 16), (5, 5, 5 * 16)]  # the state says which step comes next


def test_gradients_are_clipped_to_grad_clip_and_grad_norm_is_logged_before(models):
    teacher, student = models
    trainer = make_trainer(teacher, copy.deepcopy(student), steps=1, grad_clip=1e-3, on_log=(records := []).append,
                           log_every=1)
    seen = []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        params = [p for g in trainer.optimizer.param_groups if g.get("follows_schedule") for p in g["params"]]
        seen.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))))
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    trainer.fit()
    assert seen == [pytest.approx(1e-3, rel=1e-4)]  # clipped before the step
    assert records[0]["grad_norm"] > 1e-2  # the logged norm is the one before clipping


# -- the finite check decided on the device (the CUDA path, forced on the CPU) -----------------------------
@pytest.fixture
def deferred(monkeypatch):
    """The device-side finite check (fused AdamW with found_inf, flag read one step later) on the CPU."""
    monkeypatch.setattr(Trainer, "defer_finite_check", True)


@pytest.mark.parametrize(("kind", "precision"), [
    pytest.param("inf", SCALED, marks=needs_cpu_scaler),
    pytest.param("nan_grad", SCALED, marks=needs_cpu_scaler),
    ("nan_grad", FP32),
])
def test_deferred_finite_check_skips_like_the_host_check(models, deferred, kind, precision):
    """Decided on the device, a non-finite step is skipped (weights, moments, step count), counted, the
    scale backs off; [bad, good] ends where [good] alone does, and where the host-checked run ends."""
    teacher, student = models
    trainer = make_trainer(teacher, copy.deepcopy(student), steps=2, precision=precision,
                           losses=[LossTerm("affinity", 1.0, Scripted({0}, kind))])
    assert trainer._defers() and trainer.optimizer.defaults["fused"]
    summary = trainer.fit()
    reference = make_trainer(teacher, copy.deepcopy(student), steps=1, losses=[LossTerm("affinity", 1.0, Scripted())])
    reference.fit()
    assert summary.nonfinite_steps == 1 and trainer._pending == []
    if precision is SCALED:
        assert trainer.scaler.get_scale() == 2.0**10 * 0.5
    states_close(trainer.student.state_dict(), reference.student.state_dict())
    steps = {float(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert steps == {1.0}  # the skipped step did not count in Adam's bias correction


def test_deferred_finite_check_makes_no_host_read(models, deferred, monkeypatch):
    """The optimizer step with its finite check reads nothing back from the device (no .item(), .tolist(),
    bool(tensor)): on CUDA the queue is not drained; the flag is read at the next step."""
    teacher, student = models
    trainer = make_trainer(teacher, copy.deepcopy(student), steps=3, log_every=100)
    original = Trainer._optimizer_step

    def guarded(self, loss):
        def refuse(*args, **kwargs):
            raise AssertionError("host read in the optimizer step")

        with monkeypatch.context() as m:
            for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
                m.setattr(torch.Tensor, name, refuse)
            return original(self, loss)

    monkeypatch.setattr(Trainer, "_optimizer_step", guarded)
    pending = []
    original_step = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", lambda self, b, s: pending.append(len(self._pending))
                        or original_step(self, b, s))
    assert trainer.fit().nonfinite_steps == 0
    assert pending == [0, 0, 1]  # step 0 logs (settled at once), step 1's flag is read during step 2
    assert trainer.samples == 3 * 16


def test_deferred_finite_check_aborts_after_too_many_in_a_row(models, deferred):
    teacher, student = models
    before = copy.deepcopy(student.state_dict())
    trainer = make_trainer(teacher, copy.deepcopy(student), losses=[LossTerm("x", 1.0, Poison())], steps=8,
                           max_nonfinite_in_row=3, log_every=100)
    with pytest.raises(TrainingError, match="not finite for 3 steps in a row"):
        trainer.fit()
    after = trainer.student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("defer", [False, True])
def test_a_skipped_step_at_prune_step_prunes_one_step_later_on_both_paths(models, monkeypatch, defer):
    """Auto inheritance prunes after the first taken step from prune_step on. A step skipped there (non-finite)
    is not followed by on_step: with the outcome read on the host at once, and with the finite check decided
    on the device, where the trainer reads the flag at once when the strategy says it may replace the student
    (``replaces_at``); it used to prune after the skipped step there, one step before the host path."""
    monkeypatch.setattr(Trainer, "defer_finite_check", defer)
    teacher, _ = models
    auto = INHERITANCE.build({"name": "auto", "target_sparsity": 0.3, "prune_step": 2, "ramp_steps": 1})
    student = auto.inherit(None, copy.deepcopy(teacher))
    trainer = make_trainer(teacher, student, steps=4, inheritance=auto, log_every=100,
                           losses=[LossTerm("affinity", 1.0, Scripted({1}, "nan_grad"))])
    assert trainer._defers() is defer
    summary = trainer.fit()
    assert summary.nonfinite_steps == 1
    assert summary.replaced_at == [3]  # step index 1 (ending at 2 = prune_step) was skipped; the next prunes
