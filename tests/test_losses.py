"""Loss plug-ins against independent formulas and against open_clip's reference losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, DistillClipLoss

from compress.outputs import ClipOutput
from compress.registry import LOSSES, RegistryError

N, D = 6, 8


def make_output(seed: int, n: int = N, d: int = D, scale: float = 30.0, grad: bool = False) -> ClipOutput:
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, d, generator=g, dtype=torch.float64)
    text = torch.randn(n, d, generator=g, dtype=torch.float64)
    out = ClipOutput(
        image_features=F.normalize(image, dim=-1),
        text_features=F.normalize(text, dim=-1),
        logit_scale=torch.tensor(scale, dtype=torch.float64),
        image_embeds=image,
        text_embeds=text,
    )
    if grad:
        out.image_features.requires_grad_(True)
        out.text_features.requires_grad_(True)
        out.logit_scale.requires_grad_(True)
    return out


def total(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(terms.values())  # type: ignore[return-value]


# -- independent reference formulas (numpy, explicit loops) ------------------------------------------


def np_logits(rows: torch.Tensor, cols: torch.Tensor, s: float) -> np.ndarray:
    r, c = rows.detach().numpy(), cols.detach().numpy()
    out = np.zeros((len(r), len(c)))
    for i in range(len(r)):
        for j in range(len(c)):
            out[i, j] = s * sum(r[i, k] * c[j, k] for k in range(r.shape[1]))
    return out


def np_soft_ce(teacher_logits: np.ndarray, student_logits: np.ndarray, skip_self: bool = False) -> float:
    losses = []
    for i in range(len(teacher_logits)):
        cols = [j for j in range(teacher_logits.shape[1]) if not (skip_self and j == i)]
        t = np.array([teacher_logits[i, j] for j in cols])
        s = np.array([student_logits[i, j] for j in cols])
        p = np.exp(t - t.max()) / np.exp(t - t.max()).sum()
        log_q = s - (s.max() + math.log(np.exp(s - s.max()).sum()))
        losses.append(-sum(p[j] * log_q[j] for j in range(len(cols))))
    return float(np.mean(losses))


# -- affinity -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [50.0, "model"])
def test_affinity_matches_loop_formula(scale: float | str) -> None:
    student, teacher = make_output(0, scale=20.0), make_output(1, scale=70.0)
    loss = LOSSES.build({"name": "affinity", "weight_i2t": 0.3, "weight_t2i": 0.7, "scale": scale})
    terms = loss(student, teacher)
    s_s, s_t = (50.0, 50.0) if scale == 50.0 else (20.0, 70.0)
    ce_i2t = np_soft_ce(
        np_logits(teacher.image_features, teacher.text_features, s_t),
        np_logits(student.image_features, student.text_features, s_s),
    )
    ce_t2i = np_soft_ce(
        np_logits(teacher.text_features, teacher.image_features, s_t),
        np_logits(student.text_features, student.image_features, s_s),
    )
    assert set(terms) == {"affinity_i2t", "affinity_t2i"}
    assert terms["affinity_i2t"].item() == pytest.approx(0.3 * ce_i2t, rel=1e-10)
    assert terms["affinity_t2i"].item() == pytest.approx(0.7 * ce_t2i, rel=1e-10)


@pytest.mark.parametrize("scale", [50.0, "model"])
def test_affinity_matches_open_clip_distill_loss(scale: float | str) -> None:
    student, teacher = make_output(2, scale=15.0), make_output(3, scale=100.0)
    ours = total(LOSSES.build({"name": "affinity", "scale": scale})(student, teacher))
    if scale == "model":
        s_s, s_t = student.logit_scale, teacher.logit_scale
    else:
        s_s = s_t = torch.tensor(50.0, dtype=torch.float64)
    ref = DistillClipLoss()(
        student.image_features, student.text_features, s_s,
        teacher.image_features, teacher.text_features, s_t,
        output_dict=True,
    )["distill_loss"]  # fmt: skip
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)


def test_affinity_identical_student_gives_teacher_entropy() -> None:
    teacher = make_output(4)
    loss = LOSSES.build({"name": "affinity", "scale": "model"})
    value = total(loss(make_output(4), teacher))
    entropy = 0.0
    for rows, cols in (
        (teacher.image_features, teacher.text_features),
        (teacher.text_features, teacher.image_features),
    ):
        p = (teacher.logit_scale * rows @ cols.T).softmax(dim=1)
        entropy += 0.5 * -(p * p.log()).sum(dim=1).mean().item()
    assert value.item() == pytest.approx(entropy, rel=1e-10)


@pytest.mark.parametrize("scale", [50.0, "model"])
def test_affinity_gradient_equals_kl_gradient(scale: float | str) -> None:
    teacher = make_output(5, scale=60.0)
    student = make_output(6, scale=25.0, grad=True)
    ours = total(LOSSES.build({"name": "affinity", "scale": scale})(student, teacher))
    ours_grads = torch.autograd.grad(ours, [student.image_features, student.text_features])

    twin = make_output(6, scale=25.0, grad=True)
    s_s = 50.0 if scale == 50.0 else twin.logit_scale
    s_t = 50.0 if scale == 50.0 else teacher.logit_scale
    kl = 0.0
    for (tr, tc), (sr, sc) in (
        ((teacher.image_features, teacher.text_features), (twin.image_features, twin.text_features)),
        ((teacher.text_features, teacher.image_features), (twin.text_features, twin.image_features)),
    ):
        p = (s_t * tr @ tc.T).softmax(dim=1)
        log_q = (s_s * sr @ sc.T).log_softmax(dim=1)
        kl = kl + 0.5 * (p * (p.log() - log_q)).sum(dim=1).mean()
    kl_grads = torch.autograd.grad(kl, [twin.image_features, twin.text_features])
    for a, b in zip(ours_grads, kl_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        assert a.abs().max() > 1e-4  # the check is not vacuous


def test_affinity_model_scale_trains_student_temperature_only() -> None:
    student, teacher = make_output(7, grad=True), make_output(8)
    teacher.logit_scale.requires_grad_(True)
    total(LOSSES.build({"name": "affinity", "scale": "model"})(student, teacher)).backward()
    assert student.logit_scale.grad is not None and student.logit_scale.grad.abs() > 0
    assert teacher.logit_scale.grad is None
    student2 = make_output(7, grad=True)
    total(LOSSES.build({"name": "affinity", "scale": 50})(student2, teacher)).backward()
    assert student2.logit_scale.grad is None


def test_affinity_half_precision_computes_in_float32() -> None:
    student, teacher = make_output(9), make_output(10)

    def bf16(o: ClipOutput) -> ClipOutput:
        return ClipOutput(o.image_features.bfloat16(), o.text_features.bfloat16(), o.logit_scale.bfloat16())

    value = total(LOSSES.build("affinity")(bf16(student), bf16(teacher)))
    assert value.dtype == torch.float32
    reference = total(LOSSES.build("affinity")(student, teacher))
    assert value.item() == pytest.approx(reference.item(), rel=0.05)


@pytest.mark.parametrize("name", ["affinity", "unimodal_affinity"])
@pytest.mark.parametrize("bad", ["modle", "learned", -1.0, 0, True])
def test_bad_scale_is_a_clear_error(name: str, bad: object) -> None:
    with pytest.raises(ValueError, match="scale"):
        LOSSES.build({"name": name, "scale": bad})


@pytest.mark.parametrize("name", ["affinity", "unimodal_affinity", "feature_distill"])
def test_distillation_losses_need_a_teacher(name: str) -> None:
    with pytest.raises(ValueError, match="teacher"):
        LOSSES.build(name)(make_output(0), None)


# -- unimodal affinity --------------------------------------------------------------------------------


@pytest.mark.parametrize(("scale", "exclude_self"), [(50.0, False), ("model", False), (10.0, True)])
def test_unimodal_affinity_matches_loop_formula(scale: float | str, exclude_self: bool) -> None:
    student, teacher = make_output(11, scale=12.0), make_output(12, scale=40.0)
    spec = {"name": "unimodal_affinity", "weight_image": 0.25, "weight_text": 2.0, "scale": scale}
    terms = LOSSES.build({**spec, "exclude_self": exclude_self})(student, teacher)
    s_s, s_t = (scale, scale) if scale != "model" else (12.0, 40.0)
    expected = {}
    for key, attr in (("affinity_ii", "image_features"), ("affinity_tt", "text_features")):
        t, s = getattr(teacher, attr), getattr(student, attr)
        expected[key] = np_soft_ce(np_logits(t, t, s_t), np_logits(s, s, s_s), skip_self=exclude_self)
    assert set(terms) == {"affinity_ii", "affinity_tt"}
    assert terms["affinity_ii"].item() == pytest.approx(0.25 * expected["affinity_ii"], rel=1e-10)
    assert terms["affinity_tt"].item() == pytest.approx(2.0 * expected["affinity_tt"], rel=1e-10)


# -- feature distillation -----------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["mse", "cosine"])
@pytest.mark.parametrize("normalized", [True, False])
def test_feature_distill_matches_formula(metric: str, normalized: bool) -> None:
    student, teacher = make_output(13), make_output(14)
    loss = LOSSES.build(
        {"name": "feature_distill", "metric": metric, "normalized": normalized, "weight_image": 0.4, "weight_text": 1.5}
    )
    assert loss.needs == (() if normalized else ("image_embeds", "text_embeds"))
    terms = loss(student, teacher)
    for key, w, modality in (("feature_image", 0.4, "image"), ("feature_text", 1.5, "text")):
        suffix = "features" if normalized else "embeds"
        s = getattr(student, f"{modality}_{suffix}").numpy()
        t = getattr(teacher, f"{modality}_{suffix}").numpy()
        if metric == "mse":
            expected = np.mean([(s[i, k] - t[i, k]) ** 2 for i in range(N) for k in range(D)])
        else:
            cos = [s[i] @ t[i] / (np.linalg.norm(s[i]) * np.linalg.norm(t[i])) for i in range(N)]
            expected = np.mean([1.0 - c for c in cos])
        assert terms[key].item() == pytest.approx(w * expected, rel=1e-10)


def test_feature_distill_unnormalized_needs_embeds() -> None:
    student = make_output(15)
    student.image_embeds = None
    with pytest.raises(ValueError, match="image_embeds"):
        LOSSES.build({"name": "feature_distill", "normalized": False})(student, make_output(16))


def test_feature_distill_projector_exists_and_trains() -> None:
    context = {"student_embed_dim": 4, "teacher_embed_dim": 8}
    loss = LOSSES.build({"name": "feature_distill", "metric": "cosine"}, context=context).double()
    assert loss.projectors is not None
    assert [tuple(p.shape) for p in loss.parameters()] == [(8, 4), (8, 4)]
    student, teacher = make_output(17, d=4), make_output(18, d=8)
    before = [p.detach().clone() for p in loss.parameters()]
    opt = torch.optim.SGD(loss.parameters(), lr=0.5)
    first = total(loss(student, teacher)).item()
    for _ in range(30):
        opt.zero_grad()
        total(loss(student, teacher)).backward()
        opt.step()
    assert total(loss(student, teacher)).item() < 0.8 * first
    assert all(not torch.equal(a, b) for a, b in zip(before, loss.parameters(), strict=True))
    # the projected student is compared on the unit sphere: MSE of the normalised projection
    mse = LOSSES.build({"name": "feature_distill", "metric": "mse"}, context=context).double()
    mse.load_state_dict(loss.state_dict())
    proj = F.normalize(student.image_features @ loss.projectors["image"].weight.T, dim=-1)
    expected = 0.5 * ((proj - teacher.image_features) ** 2).mean()
    torch.testing.assert_close(mse(student, teacher)["feature_image"], expected.detach(), rtol=1e-6, atol=0)


def test_feature_distill_same_dims_has_no_projector() -> None:
    loss = LOSSES.build("feature_distill", context={"student_embed_dim": 8, "teacher_embed_dim": 8})
    assert loss.projectors is None and list(loss.parameters()) == []


def test_feature_distill_dim_mismatch_without_dims_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="student_embed_dim and teacher_embed_dim"):
        LOSSES.build("feature_distill")(make_output(19, d=4), make_output(20, d=8))


def test_feature_distill_bad_metric_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"metric.*'cosin'.*Did you mean 'cosine'"):
        LOSSES.build({"name": "feature_distill", "metric": "cosin"})


# -- CLIP contrastive ---------------------------------------------------------------------------------


def test_clip_loss_matches_open_clip() -> None:
    student = make_output(21, scale=14.0, grad=True)
    loss = LOSSES.build("clip")
    assert loss.needs_teacher is False
    terms = loss(student, None)
    assert set(terms) == {"contrastive"}
    twin = make_output(21, scale=14.0, grad=True)
    ref = ClipLoss()(twin.image_features, twin.text_features, twin.logit_scale)
    torch.testing.assert_close(terms["contrastive"], ref, rtol=1e-12, atol=0)
    terms["contrastive"].backward()
    ref.backward()
    for a, b in ((student.image_features, twin.image_features), (student.logit_scale, twin.logit_scale)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_clip_loss_matches_loop_formula() -> None:
    student = make_output(22, scale=9.0)
    logits = np_logits(student.image_features, student.text_features, 9.0)
    ce = []
    for m in (logits, logits.T):
        for i in range(N):
            ce.append(-(m[i, i] - math.log(sum(math.exp(v) for v in m[i]))))
    value = LOSSES.build("clip")(student, make_output(23))["contrastive"]
    assert value.item() == pytest.approx(float(np.mean(ce)), rel=1e-10)


# -- registry -----------------------------------------------------------------------------------------


def test_losses_are_registered_with_descriptions() -> None:
    entries = {e.name: e for e in LOSSES.entries()}
    for name in ("affinity", "unimodal_affinity", "feature_distill", "clip"):
        assert name in LOSSES.names()
        assert entries[name].description.strip()
    assert LOSSES.get("clip").needs_teacher is False
    assert all(LOSSES.get(n).needs_teacher for n in ("affinity", "unimodal_affinity", "feature_distill"))


def test_registry_builds_and_rejects_misspelt_parameters() -> None:
    loss = LOSSES.build({"name": "affinity", "scale": 50})
    assert loss.scale == 50.0
    with pytest.raises(RegistryError, match=r"'scael'.*Did you mean 'scale'"):
        LOSSES.build({"name": "affinity", "scael": 50})


def test_affinity_ignores_offered_embed_dims() -> None:
    loss = LOSSES.build("affinity", context={"student_embed_dim": 4, "teacher_embed_dim": 8})
    assert loss.scale == 50.0


def test_scaled_similarity_is_float32_under_autocast():
    """Under bf16 autocast the logits are still float32 and equal the float32 product (the matmul
    would otherwise run, and round, in bf16)."""
    from strategies.losses.common import scaled_similarity

    g = torch.Generator().manual_seed(0)
    rows = F.normalize(torch.randn(64, 32, generator=g), dim=-1)
    cols = F.normalize(torch.randn(48, 32, generator=g), dim=-1)
    scale = torch.tensor(30.0)
    reference = scale * rows @ cols.T
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = scaled_similarity(rows, cols, scale)
        half = scaled_similarity(rows.bfloat16(), cols.bfloat16(), scale)
    assert logits.dtype == torch.float32 and half.dtype == torch.float32
    torch.testing.assert_close(logits, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(half, scale * rows.bfloat16().float() @ cols.bfloat16().float().T, rtol=1e-6, atol=1e-6)
