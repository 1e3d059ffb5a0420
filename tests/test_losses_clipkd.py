"""CLIP-KD's losses (Yang et al., CVPR 2024) against formulas written in the test from the paper's equations:
interactive contrastive learning (``icl``), and contrastive relational distillation, which is ``affinity``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from compress.outputs import ClipOutput
from compress.registry import LOSSES, RegistryError

N = 5


def output(seed: int, d: int = 8, scale: float = 20.0, grad: bool = False) -> ClipOutput:
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(N, d, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(N, d, generator=g, dtype=torch.float64), dim=-1)
    out = ClipOutput(image_features=image, text_features=text, logit_scale=torch.tensor(scale, dtype=torch.float64))
    if grad:
        for t in (out.image_features, out.text_features, out.logit_scale):
            t.requires_grad_(True)
    return out


def info_nce(anchors: torch.Tensor, keys: torch.Tensor, s: float) -> float:
    """-1/N sum_i log(exp(s <a_i, k_i>) / sum_j exp(s <a_i, k_j>)), with explicit loops."""
    total = 0.0
    for i in range(len(anchors)):
        logits = [s * sum(float(anchors[i, c]) * float(keys[j, c]) for c in range(anchors.shape[1]))
                  for j in range(len(keys))]
        total -= logits[i] - math.log(sum(math.exp(v) for v in logits))
    return total / len(anchors)


def distribution(rows: torch.Tensor, cols: torch.Tensor, s: float) -> list[list[float]]:
    """The in-batch similarity distribution of every row: softmax_j(s <r_i, c_j>)."""
    out = []
    for i in range(len(rows)):
        e = [math.exp(s * float(rows[i] @ cols[j])) for j in range(len(cols))]
        out.append([v / sum(e) for v in e])
    return out


def kl(p: list[list[float]], q: list[list[float]]) -> float:
    rows = zip(p, q, strict=True)
    return sum(sum(a * math.log(a / b) for a, b in zip(pr, qr, strict=True)) for pr, qr in rows) / len(p)


def entropy(p: list[list[float]]) -> float:
    return -sum(sum(a * math.log(a) for a in row) for row in p) / len(p)


# -- icl ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [30.0, "model"])
def test_icl_matches_the_papers_info_nce(scale: float | str) -> None:
    student, teacher = output(0, scale=14.0), output(1, scale=70.0)
    terms = LOSSES.build({"name": "icl", "weight_i2t": 0.3, "weight_t2i": 1.2, "scale": scale})(student, teacher)
    s = 14.0 if scale == "model" else scale  # "model": the student's own scale, never the teacher's
    assert set(terms) == {"icl_i2t", "icl_t2i"}
    expected_i2t = info_nce(student.image_features, teacher.text_features, s)
    expected_t2i = info_nce(student.text_features, teacher.image_features, s)
    assert terms["icl_i2t"].item() == pytest.approx(0.3 * expected_i2t, rel=1e-10)
    assert terms["icl_t2i"].item() == pytest.approx(1.2 * expected_t2i, rel=1e-10)


def test_icl_gradient_check_and_the_teacher_gets_none() -> None:
    teacher = output(3, scale=50.0, grad=True)
    loss = LOSSES.build({"name": "icl", "scale": "model"})

    def f(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return sum(loss(ClipOutput(image, text, scale), teacher).values())  # type: ignore[return-value]

    student = output(2, scale=9.0, grad=True)
    assert torch.autograd.gradcheck(f, (student.image_features, student.text_features, student.logit_scale))
    f(student.image_features, student.text_features, student.logit_scale).backward()
    assert teacher.image_features.grad is None and teacher.text_features.grad is None
    assert teacher.logit_scale.grad is None


def test_icl_projects_the_student_when_sizes_differ_and_the_projector_trains() -> None:
    loss = LOSSES.build("icl", context={"student_embed_dim": 4, "teacher_embed_dim": 8}).double()
    assert loss.projectors is not None and [tuple(p.shape) for p in loss.parameters()] == [(8, 4), (8, 4)]
    student, teacher = output(4, d=4, scale=10.0), output(5, d=8)
    proj = {m: F.normalize(getattr(student, f"{m}_features") @ loss.projectors[m].weight.T, dim=-1).detach()
            for m in ("image", "text")}
    terms = loss(student, teacher)
    assert terms["icl_i2t"].item() == pytest.approx(0.5 * info_nce(proj["image"], teacher.text_features, 10.0))
    assert terms["icl_t2i"].item() == pytest.approx(0.5 * info_nce(proj["text"], teacher.image_features, 10.0))
    opt = torch.optim.SGD(loss.parameters(), lr=1.0)
    first = sum(terms.values()).item()
    for _ in range(20):
        opt.zero_grad()
        sum(loss(student, teacher).values()).backward()  # type: ignore[union-attr]
        opt.step()
    assert sum(loss(student, teacher).values()).item() < first
    assert LOSSES.build("icl", context={"student_embed_dim": 8, "teacher_embed_dim": 8}).projectors is None


def test_icl_size_mismatch_without_a_projector_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="student_embed_dim and teacher_embed_dim"):
        LOSSES.build("icl")(output(6, d=4), output(7, d=8))


@pytest.mark.parametrize(("spec", "key"), [({"scale": "learned"}, "scale"), ({"scale": 0}, "scale"),
                                           ({"weight_i2t": -1}, "weight_i2t"), ({"weight_t2i": "x"}, "weight_t2i")])
def test_icl_bad_parameters_are_refused_in_one_line(spec: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key) as error:
        LOSSES.build({"name": "icl", **spec})
    assert "\n" not in str(error.value)


def test_icl_needs_a_teacher_and_refuses_unknown_parameters() -> None:
    with pytest.raises(ValueError, match="teacher"):
        LOSSES.build("icl")(output(8), None)
    with pytest.raises(RegistryError, match="'scael'"):
        LOSSES.build({"name": "icl", "scael": 5})
    assert LOSSES.get("icl").needs_teacher and LOSSES.get("icl").similarity_matrices == 2


def test_list_losses_shows_icl(capsys: pytest.CaptureFixture[str]) -> None:
    from experiments.cli import main

    assert main(["list", "losses"]) == 0
    assert any(line.strip().startswith("icl ") for line in capsys.readouterr().out.splitlines())
    assert main(["list", "losses", "icl"]) == 0
    assert "CLIP-KD" in capsys.readouterr().out


# -- crd: CLIP-KD's contrastive relational distillation is affinity with scale: model -------------------------


def test_crd_is_affinity_with_the_models_scales_up_to_the_teachers_entropy() -> None:
    """L_CRD = 1/2 (KL(p_i2t^T || p_i2t^S) + KL(p_t2i^T || p_t2i^S)), each model at its own logit scale
    (the paper's equation); affinity's value is it plus the teacher's entropy, its gradient the same."""
    student, teacher = output(9, scale=12.0, grad=True), output(10, scale=45.0)
    terms = LOSSES.build({"name": "affinity", "scale": "model"})(student, teacher)
    si, st, ti, tt = student.image_features, student.text_features, teacher.image_features, teacher.text_features
    p_i2t, p_t2i = distribution(ti, tt, 45.0), distribution(tt, ti, 45.0)
    crd = 0.5 * (kl(p_i2t, distribution(si.detach(), st.detach(), 12.0))
                 + kl(p_t2i, distribution(st.detach(), si.detach(), 12.0)))
    teacher_entropy = 0.5 * (entropy(p_i2t) + entropy(p_t2i))
    assert sum(terms.values()).item() == pytest.approx(crd + teacher_entropy, rel=1e-10)
    # the gradient: the KL written in torch from the same equation
    twin = output(9, scale=12.0, grad=True)

    def kl_torch(t_logits: torch.Tensor, s_logits: torch.Tensor) -> torch.Tensor:
        p = t_logits.softmax(dim=1)
        return (p * (p.log() - s_logits.log_softmax(dim=1))).sum(dim=1).mean()

    s_i2t = twin.logit_scale * twin.image_features @ twin.text_features.T
    kl_loss = 0.5 * (kl_torch(45.0 * ti @ tt.T, s_i2t) + kl_torch(45.0 * tt @ ti.T, s_i2t.T))
    assert kl_loss.item() == pytest.approx(crd, rel=1e-10)
    sum(terms.values()).backward()  # type: ignore[union-attr]
    kl_loss.backward()
    for a, b in ((student.image_features, twin.image_features), (student.text_features, twin.text_features),
                 (student.logit_scale, twin.logit_scale)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_crd_is_not_a_separate_loss() -> None:
    assert "crd" not in LOSSES.names()
