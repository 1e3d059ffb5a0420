"""Masked model == physically pruned model == saved and reloaded non-uniform model."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from torch import nn

from compress.masks import attach_masks, detach_masks, prune_masked
from compress.models import load_model, load_with_transforms
from compress.models.export import save_model
from compress.models.factory import OPEN_CLIP_CONFIG_FILE
from compress.models.nonuniform import NONUNIFORM_CONFIG_FILE, save_nonuniform
from compress.models.structure import TowerKeep, describe_structure, prune_model
from tests.export_models import random_masks

TOL = 1e-5
LOW = math.log(0.01)


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    torch.manual_seed(0)
    return load_model("cc-test-teacher")


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    tokens = torch.randint(1, 49406, (4, 16))
    tokens[:, -1] = 49407  # end of text: the pooled position
    return torch.randn(4, 3, 32, 32), tokens


def _features(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.encode_image(batch[0]), model.encode_text(batch[1])


def _assert_close(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...], tol: float = TOL) -> None:
    for x, y in zip(a, b, strict=True):
        assert (x - y).abs().max().item() < tol


def _random_masks(model: nn.Module, layer_gates: bool) -> nn.Module:
    """Masks with random logits (``tests.export_models.random_masks``): vision layer 1 loses every head; with
    layer gates, vision layer 2 its whole MLP and text layer 0 its attention block."""
    return random_masks(model, layer_gates)


@pytest.mark.parametrize("layer_gates", [False, True])
def test_masked_pruned_and_reloaded_models_agree(
    teacher: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], tmp_path: Path, layer_gates: bool
) -> None:
    masked = _random_masks(copy.deepcopy(teacher), layer_gates)
    expected = _features(masked, batch)
    pruned = prune_masked(masked)
    assert not any("structure_masks" in k for k in pruned.state_dict())
    _assert_close(_features(pruned, batch), expected)

    vision, text = pruned.clip_structure["vision"], pruned.clip_structure["text"]
    assert vision["heads"][1] == 0 and len(set(vision["heads"])) > 1 and len(set(vision["mlp_width"])) > 1
    assert vision["width"] < 64 and text["width"] < 64
    if layer_gates:
        assert vision["mlp_width"][2] == 0 and text["heads"][0] == 0
    assert pruned.clip_cfg == teacher.clip_cfg  # non-uniform: the config it is relative to

    folder = save_nonuniform(pruned, tmp_path / "model")
    assert (folder / NONUNIFORM_CONFIG_FILE).is_file() and not (folder / OPEN_CLIP_CONFIG_FILE).exists()
    reloaded = load_model(str(folder))
    assert reloaded.clip_structure == describe_structure(pruned)
    _assert_close(_features(reloaded, batch), expected)
    _assert_close(_features(reloaded, batch), _features(pruned, batch), tol=1e-7)


def test_reloaded_model_works_with_open_clip_tokenizer_and_transform(teacher: nn.Module, tmp_path: Path) -> None:
    pruned = prune_masked(_random_masks(copy.deepcopy(teacher), layer_gates=False))
    save_nonuniform(pruned, tmp_path / "model")
    model, preprocess, tokenizer = load_with_transforms(tmp_path / "model")
    tokens = tokenizer(["a photo of a cat", "a dog"])
    assert tokens.shape == (2, 16)
    image = preprocess(Image.new("RGB", (40, 50), (120, 30, 200))).unsqueeze(0)
    assert image.shape == (1, 3, 32, 32)
    with torch.no_grad():
        logits = model.encode_image(image, normalize=True) @ model.encode_text(tokens, normalize=True).T
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()
    assert isinstance(open_clip.get_tokenizer("", context_length=16)(["x"]), torch.Tensor)


def test_uniform_pruning_exports_open_clip_layout(teacher: nn.Module, tmp_path: Path) -> None:
    model = copy.deepcopy(teacher)
    keep = {
        name: TowerKeep(torch.arange(64), [torch.arange(4)] * 4, [torch.arange(0, 256, 2)] * 4)
        for name in ("vision", "text")
    }
    prune_model(model, keep)
    assert model.clip_cfg["vision_cfg"]["mlp_ratio"] == 2.0 and model.clip_cfg["text_cfg"]["mlp_ratio"] == 2.0
    folder = save_model(model, tmp_path / "uniform")
    assert (folder / OPEN_CLIP_CONFIG_FILE).is_file()
    by_open_clip = open_clip.create_model(f"local-dir:{folder}")
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(0, 49408, (2, 16))
    _assert_close(_features(by_open_clip.eval(), (images, tokens)), _features(model, (images, tokens)))


def test_detach_without_fold_restores_the_model(teacher: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = copy.deepcopy(teacher)
    keys = list(model.state_dict())
    attach_masks(model)
    model.train()
    out = model.encode_image(batch[0]).sum() + model.encode_text(batch[1]).sum()
    copied = copy.deepcopy(model)  # gates of the forward above hold graphs: copies drop them
    out.backward()
    assert all(p.grad is not None for p in model.structure_masks.mask_parameters())
    detach_masks(model)
    detach_masks(copied)
    assert list(model.state_dict()) == keys and list(copied.state_dict()) == keys
    _assert_close(_features(model.eval(), batch), _features(teacher, batch), tol=1e-7)


def test_vision_only_masks_leave_text_alone(teacher: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = _random_masks_vision(copy.deepcopy(teacher))
    pruned = prune_masked(model)
    assert pruned.clip_structure["text"]["width"] == 64
    _assert_close(_features(pruned, batch)[1], _features(teacher, batch)[1], tol=1e-7)


def _random_masks_vision(model: nn.Module) -> nn.Module:
    masks = attach_masks(model, towers="vision")
    with torch.no_grad():
        masks.towers["vision"].neurons.log_alpha[:300] = LOW
    return model.eval()


def test_structure_report_from_an_export(teacher: nn.Module, tmp_path: Path) -> None:
    import subprocess
    import sys

    from analysis.structure_report import structure_table, write_structure_report
    from compress.models.nonuniform import write_structure

    pruned = prune_masked(_random_masks(copy.deepcopy(teacher), layer_gates=False))
    save_nonuniform(pruned, tmp_path / "model", report_dir=tmp_path)
    assert (tmp_path / "structure.json").is_file() and write_structure(pruned, tmp_path) == tmp_path / "structure.json"
    paths = write_structure_report(tmp_path)
    assert paths["heatmap"].stat().st_size > 1000
    table = paths["table"].read_text()
    assert table == structure_table(pruned.clip_structure)
    assert "| 1 | 0 / 4 | 0% |" in table  # vision layer 1 lost all its heads
    assert write_structure_report(tmp_path / "model", tmp_path / "again")["table"].read_text() == table
    code = "import sys, analysis.structure_report; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1]).returncode == 0


def test_second_stage_from_a_non_uniform_source(teacher: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Multi-stage: masks on a pruned model (uneven layers, a layer without heads) prune exactly again."""
    first = prune_masked(_random_masks(copy.deepcopy(teacher), layer_gates=False))
    masks = attach_masks(first)
    assert masks.towers["vision"].heads.segments == first.clip_structure["vision"]["heads"]
    with torch.no_grad():
        for tower in masks.towers.values():
            tower.neurons.log_alpha[::3] = LOW
            tower.channels.log_alpha[:5] = LOW
    first.eval()
    expected = _features(first, batch)
    second = prune_masked(first)
    _assert_close(_features(second, batch), expected)
    assert second.clip_structure["vision"]["heads"][1] == 0
    assert second.clip_structure["vision"]["width"] < first.clip_structure["vision"]["width"]
    assert second.clip_structure["vision"]["full"]["width"] == 64  # still relative to the original config
