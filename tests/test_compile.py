"""``train.compile``: the student's towers compiled in place train like the eager student (float
tolerance), keep their state-dict keys, leave the run id alone; a masked student runs eagerly."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from compress.config import TrainConfig
from compress.models import load_model
from compress.precision import resolve_precision
from compress.recipe import run_id_of
from compress.registry import LOSSES, SCHEDULES
from compress.teacher import OnlineTeacher
from compress.train import LossTerm, Trainer

FP32 = resolve_precision("fp32", torch.device("cpu"))


def _trainer(teacher, student, compile_: bool, steps: int = 2, accum: int = 2) -> Trainer:
    cfg = TrainConfig(steps=steps, batch_size=8, accum_steps=accum, lr=1e-3, progress=False, compile=compile_)
    g = torch.Generator().manual_seed(0)
    micro = 8 // accum  # the stream yields micro-batches (the loader's batch), accum of them per step
    batch = {"images": torch.randn(micro, 3, 32, 32, generator=g),
             "texts": torch.randint(1, 400, (micro, 16), generator=g)}
    losses = [LossTerm("affinity", 1.0, LOSSES.build({"name": "affinity", "scale": "model"}))]
    lr = SCHEDULES.build("constant", context={"base_value": cfg.lr})
    return Trainer(cfg, student, losses, lr, itertools.repeat(batch), FP32, teacher=OnlineTeacher(teacher, FP32))


@pytest.mark.slow
def test_compiled_student_trains_like_the_eager_one(monkeypatch):
    """Two accumulated steps with the towers compiled (backend aot_eager here: dynamo's capture and AOT
    autograd's forward and backward graphs; inductor's code generation is what CUDA adds) end within float
    tolerance of the eager run, and the state dict (checkpoints, exports) has the eager keys."""
    monkeypatch.setattr(Trainer, "compile_backend", "aot_eager")
    torch.manual_seed(0)
    teacher, student = load_model("cc-test-teacher"), load_model("cc-test-student")
    eager = _trainer(teacher, copy.deepcopy(student), False)
    compiled = _trainer(teacher, copy.deepcopy(student), True)
    assert compiled.student.visual._compiled_call_impl is not None and eager.student.visual._compiled_call_impl is None
    eager.fit()
    compiled.fit()
    a, b = eager.student.state_dict(), compiled.student.state_dict()
    assert list(a) == list(b) and not any("_orig_mod" in k for k in b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    assert not any("_orig_mod" in str(k) for k in compiled.state_dict()["optimizer"]["param_groups"][0])


def test_compile_is_not_part_of_the_run_id():
    from compress.recipe import config_from_dict

    data = {"name": "t", "teacher": {"model": "cc-test-teacher", "random_init": True},
            "student": {"model": "cc-test-student"}}
    plain = config_from_dict(data)
    compiled = config_from_dict({**data, "train": {"compile": True}})
    assert compiled.train.compile and not plain.train.compile
    assert run_id_of(plain) == run_id_of(compiled)


def test_a_masked_student_runs_eagerly_until_pruned(caplog):
    from compress.masks import attach_masks

    torch.manual_seed(0)
    teacher, student = load_model("cc-test-teacher"), load_model("cc-test-student")
    attach_masks(student)
    trainer = _trainer(teacher, student, True, steps=1, accum=1)
    assert trainer.student.visual._compiled_call_impl is None
    assert "runs eagerly until it is pruned" in caplog.text


def test_the_compiled_text_tower_still_gives_sdpa_is_causal():
    """Compiled, the attention cannot look at the mask's values (``is_causal_mask`` answers False while
    compiling); ``compile_towers`` looks at the text tower's mask once before, so the compiled graph calls SDPA
    with ``is_causal=True`` and no mask tensor (flash kernels allowed), and equals the eager tower."""
    import torch.nn.functional as F

    from compress.live_forward import compile_towers

    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    eager = load_model("cc-test-student").eval()
    compiled = copy.deepcopy(eager)
    compile_towers(compiled, backend=recording)
    tokens = torch.randint(1, 400, (2, eager.context_length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = compiled.encode_text(tokens)
        expected = eager.encode_text(tokens)
    sdpa = [n for g in graphs for n in g.graph.nodes
            if n.op == "call_function" and n.target is F.scaled_dot_product_attention]
    assert len(sdpa) == len(eager.transformer.resblocks)
    assert all(n.kwargs.get("is_causal") is True and n.kwargs.get("attn_mask") is None for n in sdpa), [
        n.kwargs for n in sdpa]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
