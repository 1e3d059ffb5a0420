"""pad_to_uniform: a non-uniform student as a uniform open_clip model computing the same function."""

from __future__ import annotations

import copy
from pathlib import Path

import open_clip
import pytest
import torch
from torch import nn

from compress.masks import attach_masks
from compress.models import load_model
from compress.models.export import save_open_clip
from compress.models.nonuniform import save_nonuniform
from compress.models.pad import PaddingError, pad_to_uniform, uniform_config
from tests.export_models import pruned_student

#: open_clip's nn.MultiheadAttention against this project's attention: float rounding (the conversion's own)
TOL = 1e-5


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    torch.manual_seed(0)
    return load_model("cc-test-teacher")


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, 49406, (4, 16), generator=generator)
    tokens[:, -1] = 49407
    return torch.randn(4, 3, 32, 32, generator=generator), tokens


def _pruned(teacher: nn.Module, keep_channels: bool, layer_gates: bool = False) -> nn.Module:
    """The automatically pruned test student (``tests.export_models.pruned_student``; ``teacher`` is the same
    ``cc-test-teacher``)."""
    return pruned_student(layer_gates=layer_gates, keep_channels=keep_channels)


def _features(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.encode_image(batch[0]), model.encode_text(batch[1])


@pytest.mark.parametrize("layer_gates", [False, True])
def test_padded_model_is_the_same_function(teacher: nn.Module, batch, layer_gates: bool) -> None:
    student = _pruned(teacher, keep_channels=True, layer_gates=layer_gates)
    structure = student.clip_structure
    assert len(set(structure["vision"]["heads"])) > 1 and len(set(structure["text"]["mlp_width"])) > 1
    if layer_gates:
        assert structure["vision"]["mlp_width"][2] == 0 and structure["text"]["heads"][0] == 0
    expected = _features(student, batch)
    # with this project's attention, zero heads and neurons change no bit
    same = pad_to_uniform(student, convert=True)
    assert all(torch.equal(a, b) for a, b in zip(_features(same, batch), expected, strict=True))
    # as open_clip builds it: nn.MultiheadAttention, float rounding only
    padded = pad_to_uniform(student)
    assert not any(isinstance(m, type(same.transformer.resblocks[0].attn)) for m in padded.modules())
    for a, b in zip(_features(padded, batch), expected, strict=True):
        assert (a - b).abs().max().item() < TOL
    cfg = padded.clip_cfg
    assert cfg["vision_cfg"]["head_width"] == 16 and cfg["text_cfg"]["heads"] == 4
    for name, key in (("vision", "vision_cfg"), ("text", "text_cfg")):
        assert int(64 * cfg[key]["mlp_ratio"]) == max(structure[name]["mlp_width"])
    assert student.clip_structure == structure  # the student is left as it was


def test_saved_padded_model_loads_in_open_clip_alone(teacher: nn.Module, batch, tmp_path: Path) -> None:
    student = _pruned(teacher, keep_channels=True)
    save_nonuniform(student, tmp_path / "nonuniform")
    folder = save_open_clip(pad_to_uniform(load_model(str(tmp_path / "nonuniform"))), tmp_path / "uniform")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    for a, b in zip(_features(model.eval(), batch), _features(student, batch), strict=True):
        assert (a - b).abs().max().item() < TOL
    assert preprocess.transforms[0].size == 32


def test_a_uniform_model_pads_to_itself(teacher: nn.Module, batch) -> None:
    same = pad_to_uniform(teacher, convert=True)
    assert same.clip_cfg["vision_cfg"]["mlp_ratio"] == 4.0 and same.clip_cfg["text_cfg"]["heads"] == 4
    assert all(torch.equal(a, b) for a, b in zip(_features(same, batch), _features(teacher, batch), strict=True))


def test_refused_where_no_uniform_form_exists(teacher: nn.Module) -> None:
    student = _pruned(teacher, keep_channels=False)  # residual width below 64, up to 4 heads of 16 kept
    assert student.clip_structure["vision"]["width"] == 46
    with pytest.raises(PaddingError, match=r"^vision tower: residual width 46 is not a multiple of the head dim 16$"):
        pad_to_uniform(student)
    structure = {"vision": {"width": 48, "head_dim": 16, "heads": [4, 1], "mlp_width": [8, 8]}}
    with pytest.raises(PaddingError, match="a layer keeps 4 heads of dim 16 .* allows 3"):
        uniform_config(teacher.clip_cfg, structure)
    structure = {"vision": {"width": 50, "head_dim": 16, "heads": [1, 1], "mlp_width": [8, 8]}}
    with pytest.raises(PaddingError, match="not a multiple of the head dim 16"):
        uniform_config(teacher.clip_cfg, structure)
    cfg = copy.deepcopy(teacher.clip_cfg)
    cfg["text_cfg"]["scale_fc"] = True
    structure = {"text": {"width": 64, "head_dim": 16, "heads": [1, 1], "mlp_width": [8, 9]}}
    with pytest.raises(PaddingError, match="scale_fc"):
        uniform_config(cfg, structure)
    masked = copy.deepcopy(teacher)
    attach_masks(masked)
    with pytest.raises(PaddingError, match="learnable masks"):
        pad_to_uniform(masked)
