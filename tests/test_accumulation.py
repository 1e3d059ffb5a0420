"""Gradient accumulation at the real size's shape: the loader yields micro-batches, the trainer draws
``accum_steps`` of them per step, the loss over the whole step's batch is computed once (gradient
cache, Gao et al. 2021), BatchNorm statistics move once per micro-batch, fp16's scaler stays right."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

import strategies.losses.affinity as affinity_module
import strategies.losses.clip as clip_module
from compress.config import TrainConfig
from compress.live_forward import FEATURES, LiveForward
from compress.masks import get_masks
from compress.models import load_model
from compress.models.forward import clip_forward
from compress.registry import LOSSES, SCHEDULES
from compress.train import LossTerm, Trainer
from compress.training_error import TrainingError
from tests.test_train import FP32, SCALED, all_grads, make_batch, make_trainer, models, needs_cpu_scaler, states_close

__all__ = ["models"]  # the module-scoped fixture of tests/test_train.py


def micro_batches(n: int, size: int) -> list[dict[str, torch.Tensor]]:
    return [make_batch(size, seed=100 + i) for i in range(n)]


def collated(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@pytest.mark.parametrize("accum", [1, 4, 16])
def test_the_loss_is_computed_once_per_step_whatever_accum_steps(models, monkeypatch, accum):
    """A step of global batch 16 computes affinity's 4 and CLIP's 2 similarity products once, for any
    K (recomputing the whole batch's loss in every micro-batch pass made it 6 K), and each loss
    plug-in runs once; the objective and gradients still equal K = 1's."""
    teacher, student = models
    products = []

    def counted(rows, cols, scale):
        products.append((rows.shape[0], cols.shape[0]))
        return original(rows, cols, scale)

    original = affinity_module.scaled_similarity
    monkeypatch.setattr(affinity_module, "scaled_similarity", counted)
    monkeypatch.setattr(clip_module, "scaled_similarity", counted)
    trainer = make_trainer(teacher, copy.deepcopy(student), accum=accum)
    calls = []
    for term in trainer.losses:
        term.module.register_forward_hook(lambda module, args, out: calls.append(type(module).__name__))
    loss, _ = trainer._forward_backward(make_batch(), 0)
    assert len(products) == 6 and set(products) == {(16, 16)}  # B x B over the whole step's batch
    assert sorted(calls) == ["AffinityMimicking", "ClipContrastive"]
    reference = make_trainer(teacher, copy.deepcopy(student), accum=1)
    reference_loss, _ = reference._forward_backward(make_batch(), 0)
    assert loss.item() == pytest.approx(reference_loss.item(), rel=1e-5)
    expected = all_grads(reference)
    for name, grad in all_grads(trainer).items():  # 16 summed micro-batches round a little more than 4
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6 * accum, msg=name)


def test_fit_draws_accum_steps_micro_batches_per_step(models):
    """fit() takes K micro-batches of batch_size / K from the stream per step and trains as on their
    concatenation with K = 1; the stream is not read further than the steps need."""
    teacher, student = models
    parts = micro_batches(8, 4)
    stream = iter(parts + micro_batches(4, 4))
    # eps 1e-3: Adam would blow the rounding noise of gradients that are truly 0 (a key bias) up to lr
    accumulated = make_trainer(teacher, copy.deepcopy(student), accum=4, steps=2, batches=stream, eps=1e-3)
    accumulated.fit()
    assert len(list(stream)) == 4  # 2 steps x 4 micro-batches drawn, the rest untouched
    whole = make_trainer(teacher, copy.deepcopy(student), accum=1, steps=2, eps=1e-3,
                         batches=iter([collated(parts[:4]), collated(parts[4:])]))
    whole.fit()
    for key, value in whole.student.state_dict().items():
        torch.testing.assert_close(accumulated.student.state_dict()[key], value, rtol=1e-4, atol=1e-6, msg=key)
    assert accumulated.samples == whole.samples == 32


def test_a_stream_of_whole_step_batches_is_refused_under_accumulation(models):
    teacher, student = models
    trainer = make_trainer(teacher, copy.deepcopy(student), accum=4, batches=itertools.repeat(make_batch(16)))
    with pytest.raises(TrainingError, match=r"batch of 16 samples; a step takes 4 micro-batches .* = 4"):
        trainer.fit()


@needs_cpu_scaler
def test_scaled_accumulated_step_equals_unscaled(models):
    """fp16's gradient scaler: the loss is scaled once, the output gradients carry the scale into the
    live passes, unscale_ divides every gradient by it, so the step equals the unscaled one."""
    teacher, student = models
    scaled = make_trainer(teacher, copy.deepcopy(student), accum=4, steps=2, precision=SCALED,
                          batches=iter(micro_batches(8, 4)))
    plain = make_trainer(teacher, copy.deepcopy(student), accum=4, steps=2, batches=iter(micro_batches(8, 4)))
    assert scaled.fit().nonfinite_steps == 0 and plain.fit().nonfinite_steps == 0
    assert scaled.scaler.get_scale() == 2.0**10
    states_close(scaled.student.state_dict(), plain.student.state_dict())


def test_batch_norm_statistics_move_once_per_micro_batch():
    """A ResNet student under accumulation: the features pass normalises with the micro-batch's
    statistics but leaves the running statistics alone; only the live pass updates them, once per
    micro-batch, as two plain training-mode forwards would."""
    torch.manual_seed(0)
    student = load_model("cc-test-rn-student")
    reference = copy.deepcopy(student).train()
    g = torch.Generator().manual_seed(0)
    batch = {"images": torch.randn(8, 3, 64, 64, generator=g), "texts": torch.randint(1, 400, (8, 16), generator=g)}
    cfg = TrainConfig(steps=1, batch_size=8, accum_steps=2, lr=1e-3, progress=False)
    trainer = Trainer(cfg, student, [LossTerm("clip", 1.0, LOSSES.build("clip"))],
                      SCHEDULES.build("constant", context={"base_value": cfg.lr}), iter(()), FP32)
    trainer.student.train()
    trainer._forward_backward(batch, 0)
    with torch.no_grad():
        for half in (slice(0, 4), slice(4, 8)):
            clip_forward(reference, batch["images"][half], batch["texts"][half])
    norms = {n: m for n, m in trainer.student.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    expected = {n: m for n, m in reference.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert norms and norms.keys() == expected.keys()
    for name, norm in norms.items():
        assert int(norm.num_batches_tracked) == 2, name
        torch.testing.assert_close(norm.running_mean, expected[name].running_mean, msg=name)
        torch.testing.assert_close(norm.running_var, expected[name].running_var, msg=name)


@pytest.mark.parametrize("kind", ["vit", "masked", "resnet", "pruned", "pruned-masked"])
def test_every_parameter_ddp_holds_is_used_by_a_live_pass(models, kind):
    """What makes ``find_unused_parameters=False`` right: one live pass (features and embeddings) reaches
    every trained student parameter except the logit scale, a strategy's own (masks, multipliers) and those
    no forward reads (a layer pruned to no heads or neurons: ``unused_parameters``), which the trainer keeps
    out of DDP; and none of the latter gets a gradient that would then not be averaged."""
    from compress.masks import attach_masks
    from compress.models.towers import unused_parameters
    from compress.registry import INHERITANCE
    from tests.test_ddp import pruned_student

    teacher, student = models
    strategy = INHERITANCE.build({"name": "none"})
    if kind == "masked":
        strategy = INHERITANCE.build({"name": "auto"})
        student = strategy.inherit(None, teacher)
    elif kind == "resnet":
        student = load_model("cc-test-rn-student")
    elif kind.startswith("pruned"):
        student = pruned_student()
        if kind == "pruned-masked":  # auto inheritance on a stage whose source lost whole layers' heads
            attach_masks(student)
    student = copy.deepcopy(student).train()
    size = 64 if kind == "resnet" else 32
    live = LiveForward(student, ("image_embeds", "text_embeds"))
    outputs = live(torch.randn(4, 3, size, size), torch.randint(1, 400, (4, 16)))
    assert len(outputs) == len(FEATURES)
    sum(o.float().sum() for o in outputs if o is not None).backward()
    masks = get_masks(student)
    outside = strategy.owned_parameters(student) | {id(student.logit_scale)}
    outside |= {id(p) for p in masks.mask_parameters()} if masks is not None else set()
    unread = {id(p) for p in unused_parameters(student)}
    unused = [n for n, p in student.named_parameters()
              if p.requires_grad and id(p) not in outside | unread and p.grad is None]
    assert unused == []
    read = [n for n, p in student.named_parameters() if id(p) in unread and p.grad is not None and p.numel()]
    assert read == []
    if kind.startswith("pruned"):  # layer 0 of each tower has no heads: its ln_1 is read by nothing
        names = {n for n, p in student.named_parameters() if id(p) in unread and p.numel()}
        assert names == {f"{t}transformer.resblocks.0.ln_1.{w}" for t in ("visual.", "") for w in ("weight", "bias")}


@pytest.mark.parametrize(("accum", "micro"), [(1, 16), (4, 4)])
def test_the_training_loader_yields_micro_batches(accum, micro):
    """The loader's batch is the micro-batch, batch_size / (processes x accum_steps): the batches in flight
    and the data position (counted in loader batches) are micro-batches; a step draws K of them."""
    from compress.data.pipeline import train_batches
    from compress.recipe import config_from_dict

    cfg = config_from_dict({
        "name": "micro", "teacher": {"model": "cc-test-teacher", "random_init": True},
        "student": {"model": "cc-test-student"}, "inheritance": {"name": "manual"}, "losses": [{"name": "affinity"}],
        "data": {"train": {"kind": "synthetic", "num_samples": 64}},
        "train": {"steps": 1, "batch_size": 16, "accum_steps": accum},
    })
    stream, stats = train_batches(cfg, load_model("cc-test-student"), None, torch.device("cpu"))
    drawn = [next(stream) for _ in range(accum)]
    assert [len(b["images"]) for b in drawn] == [micro] * accum
    state = stats.loader.state_dict()
    assert state["batch_size"] == micro and state["batches_in_epoch"] == accum


def test_the_live_pass_replays_the_features_pass_dropout(models):
    """A student that draws random numbers in its forward (dropout): each micro-batch's live pass draws
    what its pass without graph drew, so the output gradients of the cached loss apply to it."""
    teacher, student = models
    clip = [LossTerm("clip", 1.0, LOSSES.build("clip"))]
    trainer = make_trainer(teacher, copy.deepcopy(student), accum=2, losses=clip)
    trainer.student.train()
    trainer.student.visual.ln_post.register_forward_hook(lambda m, args, out: torch.nn.functional.dropout(out, 0.5))
    seen = []
    trainer.live.register_forward_hook(lambda m, args, out: seen.append(out[0].detach().clone()))
    trainer._forward_backward(make_batch(), 0)
    assert len(seen) == 4  # two passes without graph, then two live passes
    torch.testing.assert_close(seen[2], seen[0], rtol=0, atol=0)
    torch.testing.assert_close(seen[3], seen[1], rtol=0, atol=0)
    images, texts = make_batch(2)["images"], make_batch(2)["texts"]
    assert not torch.equal(trainer.live(images, texts)[0], trainer.live(images, texts)[0])  # dropout draws


def pipeline_trainer(teacher, student, accum_inputs: str, steps: int = 2, build=None):
    """A trainer on the real training pipeline (synthetic data, K = 4 micro-batches of 4), its stream
    wrapped to record every micro-batch it yields (weak references: what keeps them alive is the trainer)."""
    import weakref

    from compress.data.pipeline import ReplayStream, train_batches
    from compress.recipe import config_from_dict

    cfg = config_from_dict({
        "name": "replay", "teacher": {"model": "cc-test-teacher", "random_init": True},
        "student": {"model": "cc-test-student"}, "inheritance": {"name": "manual"}, "losses": [{"name": "affinity"}],
        "data": {"train": {"kind": "synthetic", "num_samples": 64}},
        "train": {"steps": steps, "batch_size": 16, "accum_steps": 4, "accum_inputs": accum_inputs},
    })
    stream, stats = train_batches(cfg, student, None, torch.device("cpu"))
    if build is not None:
        stats.replay = ReplayStream(build(cfg, student), stats.loader)
    drawn: list = []

    class Recorded:  # no generator frame of ours holds the last batch
        def __next__(self):
            batch = next(stream)
            drawn.append(weakref.ref(batch["images"]))
            return batch

    trainer = make_trainer(teacher, student, accum=4, steps=steps, batches=Recorded(), eps=1e-3)
    trainer.replay = stats.replay
    alive_at_loss: list[int] = []
    trainer.losses[0].module.register_forward_pre_hook(
        lambda *_: alive_at_loss.append(sum(ref() is not None for ref in drawn)))
    return trainer, stats, alive_at_loss


@pytest.mark.parametrize("accum_inputs", ["reread", "keep"])
def test_reread_keeps_none_of_the_steps_micro_batches_and_trains_as_keep(models, accum_inputs):
    """``train.accum_inputs: reread``: when the loss runs, at most the loader's last micro-batch of the step
    is alive (``keep`` holds all K = 4 for the live pass); the step is the same, bit for bit."""
    teacher, student = models
    trainer, stats, alive = pipeline_trainer(teacher, copy.deepcopy(student), accum_inputs)
    assert (stats.replay is not None) == (accum_inputs == "reread")
    trainer.fit()
    assert alive == ([1, 1] if accum_inputs == "reread" else [4, 4])
    reference, _, _ = pipeline_trainer(teacher, copy.deepcopy(student), "keep")
    reference.fit()
    for key, value in reference.student.state_dict().items():
        torch.testing.assert_close(trainer.student.state_dict()[key], value, rtol=0, atol=0, msg=key)
    if stats.replay is not None:
        assert stats.replay.resyncs == 0 and stats.as_metrics()["data/replay_resyncs"] == 0
        assert stats.as_metrics()["data/replay_by_key_steps"] == 0


def test_a_second_reading_out_of_step_is_read_again_by_key_and_restarted(models, capsys):
    """The second loader gives other samples than the first pass read (here: its first build has another
    seed): those micro-batches are read again by key, the second loader is restarted from the first's
    position at the next step, and the run trains exactly as with ``keep``."""
    from compress.data.loader import build_train_loader
    from compress.data.transforms import train_transform_for
    from compress.models.forward import tokenizer_for

    teacher, student = models
    seeds = iter([99, 0, 0])

    def build(cfg, model):
        def make():
            return build_train_loader(cfg.data, train_transform_for(model, None), tokenizer_for(model), 4,
                                      seed=next(seeds), pin_memory=False)
        return make

    trainer, stats, _ = pipeline_trainer(teacher, copy.deepcopy(student), "reread", steps=2, build=build)
    trainer.fit()
    assert stats.replay.resyncs == 1 and next(seeds) == 0  # built twice: once out of step, then in step
    assert "the second reading of a micro-batch failed (other samples" in capsys.readouterr().err
    reference, _, _ = pipeline_trainer(teacher, copy.deepcopy(student), "keep", steps=2)
    reference.fit()
    for key, value in reference.student.state_dict().items():
        torch.testing.assert_close(trainer.student.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_a_step_without_an_active_loss_moves_both_readings_on(models):
    """A step whose loss weights are all 0 reads its micro-batches all the same (the data position moves),
    the second reading with them: the next steps' second reading is still in step (no restart)."""

    class OffAtFirst:
        def __call__(self, step: int) -> float:
            return 0.0 if step == 0 else 1.0

    teacher, student = models
    trainer, stats, _ = pipeline_trainer(teacher, copy.deepcopy(student), "reread", steps=2)
    trainer.losses[0].schedule = OffAtFirst()
    trainer.fit()
    assert stats.replay.resyncs == 0
    assert stats.loader.state_dict()["batches_in_epoch"] == 8  # 2 steps x 4 micro-batches
    reference, _, _ = pipeline_trainer(teacher, copy.deepcopy(student), "keep", steps=2)
    reference.losses[0].schedule = OffAtFirst()
    reference.fit()
    for key, value in reference.student.state_dict().items():
        torch.testing.assert_close(trainer.student.state_dict()[key], value, rtol=0, atol=0, msg=key)
