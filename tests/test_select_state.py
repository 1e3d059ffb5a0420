"""The one slicing rule (``compress.models.structure.select_state``): what manual inheritance and the masks'
export both hand their kept units to. Kept layers are renumbered, other units (embedding dims, positions,
vocabulary) selected, the model itself left unchanged, an axis kept whole not copied."""

from __future__ import annotations

import pytest
import torch

from compress.models import load_model
from compress.models.structure import TowerKeep, prune_model, select_state
from compress.registry import INHERITANCE


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    torch.manual_seed(5)
    return load_model("cc-test-teacher")


def _leading(width: int, heads: int, mlp: int, depth: int, **kw: object) -> TowerKeep:
    return TowerKeep(torch.arange(width), [torch.arange(heads)] * depth, [torch.arange(mlp)] * depth, **kw)


def test_layers_and_units_are_selected_and_the_model_is_unchanged(teacher: torch.nn.Module) -> None:
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    keep = {"text": _leading(48, 3, 100, 2, layers=[1, 3], units={"embed": torch.arange(16), "vocab": torch.arange(9)})}
    state, structure = select_state(teacher, keep)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert structure["text"] == {"width": 48, "head_dim": 16, "heads": [3, 3], "mlp_width": [100, 100]}
    assert not any(k.startswith("transformer.resblocks.2.") for k in state)
    src = before["transformer.resblocks.3.mlp.c_fc.weight"]
    assert torch.equal(state["transformer.resblocks.1.mlp.c_fc.weight"], src[:100, :48])
    q_k_v = before["transformer.resblocks.1.attn.in_proj_weight"].view(3, 64, 64)
    assert torch.equal(state["transformer.resblocks.0.attn.in_proj_weight"], q_k_v[:, :48, :48].reshape(144, 48))
    assert state["token_embedding.weight"].shape == (9, 48)
    assert torch.equal(state["text_projection"], before["text_projection"][:48, :16])


def test_an_axis_kept_whole_is_not_copied(teacher: torch.nn.Module) -> None:
    keep = {"text": _leading(64, 4, 256, 4, units={"vocab": torch.arange(49408)})}
    state, _ = select_state(teacher, keep)
    assert state["token_embedding.weight"].data_ptr() == teacher.token_embedding.weight.data_ptr()


def test_prune_model_refuses_layers_and_units(teacher: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="keeps every layer and every embedding unit"):
        prune_model(teacher, {"text": _leading(64, 4, 256, 2, layers=[0, 2])})


def test_manual_inheritance_leaves_its_source_unchanged(teacher: torch.nn.Module) -> None:
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = INHERITANCE.build("manual").inherit(load_model("cc-test-student"), teacher)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert torch.equal(student.token_embedding.weight, teacher.token_embedding.weight)
    assert student.token_embedding.weight.data_ptr() != teacher.token_embedding.weight.data_ptr()
