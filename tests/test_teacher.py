"""The frozen teacher as it runs: GEMM weights stored once in the compute dtype, inference mode,
outputs bit for bit those of the float32 teacher under autocast, returned as ordinary float32 tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compress.models import load_model
from compress.models.forward import clip_forward
from compress.precision import Precision, resolve_precision
from compress.teacher import OnlineTeacher, freeze, matmul_parameters

CPU_BF16 = Precision("bf16", torch.device("cpu"))  # CPU autocast: the same casting logic as on CUDA


@pytest.fixture(scope="module")
def loaded():
    torch.manual_seed(0)
    return freeze(load_model("cc-test-teacher"))


def _teacher_and_batch(teacher):
    g = torch.Generator().manual_seed(0)
    batch = {"images": torch.randn(4, 3, 32, 32, generator=g), "texts": torch.randint(1, 400, (4, 16), generator=g)}
    return teacher, batch


def test_fp32_teacher_on_cpu_is_used_as_it_is(loaded):
    teacher, batch = _teacher_and_batch(loaded)
    online = OnlineTeacher(teacher, resolve_precision("fp32", "cpu"), ("image_embeds",))
    assert online.teacher is teacher
    with torch.no_grad():
        reference = clip_forward(teacher, batch["images"], batch["texts"], ("image_embeds",))
    out = online(batch)
    for name in ("image_features", "text_features", "logit_scale", "image_embeds"):
        assert torch.equal(getattr(out, name), getattr(reference, name)), name


def test_half_precision_teacher_stores_gemm_weights_once_and_gives_the_same_outputs(loaded):
    """Under bf16 the teacher's linear/attention/projection weights are bf16 (cast once, not in every
    forward), norms and embeddings stay float32; its outputs equal, bit for bit, the float32 teacher's
    under autocast, come back as float32, and the teacher it was given is left in float32."""
    teacher, batch = _teacher_and_batch(loaded)
    needs = ("image_embeds", "text_embeds")
    with torch.no_grad(), CPU_BF16.autocast():
        reference = clip_forward(teacher, batch["images"], batch["texts"], needs)
    online = OnlineTeacher(teacher, CPU_BF16, needs)
    cast = {id(getattr(m, n)) for m, n in matmul_parameters(online.teacher)}
    dtypes = {name: p.dtype for name, p in online.teacher.named_parameters()}
    assert dtypes["visual.transformer.resblocks.0.attn.in_proj_weight"] == torch.bfloat16
    assert dtypes["transformer.resblocks.0.mlp.c_fc.weight"] == torch.bfloat16
    assert dtypes["text_projection"] == torch.bfloat16 and dtypes["visual.proj"] == torch.bfloat16
    assert dtypes["token_embedding.weight"] == torch.float32 and dtypes["ln_final.weight"] == torch.float32
    assert all((p.dtype == torch.bfloat16) == (id(p) in cast) for p in online.teacher.parameters())
    assert all(p.dtype == torch.float32 for p in teacher.parameters())  # the source of inheritance is untouched
    out = online(batch)
    for name in ("image_features", "text_features", "logit_scale", *needs):
        value = getattr(out, name)
        assert value.dtype == torch.float32, name
        assert torch.equal(value, getattr(reference, name).float()), name


def test_teacher_runs_in_inference_mode_and_its_outputs_feed_a_backward(loaded):
    teacher, batch = _teacher_and_batch(loaded)
    seen = []
    hook = teacher.visual.register_forward_hook(lambda *_: seen.append(torch.is_inference_mode_enabled()))
    try:
        out = OnlineTeacher(teacher, resolve_precision("fp32", "cpu"), ("image_embeds",))(batch)
    finally:
        hook.remove()
    assert seen == [True]
    assert not any(t.is_inference() for t in (out.image_features, out.text_features, out.image_embeds))
    student = torch.zeros_like(out.image_embeds, requires_grad=True)
    F.mse_loss(student, out.image_embeds).backward()  # saves the teacher's tensor for the backward
    assert student.grad is not None
