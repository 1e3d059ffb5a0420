"""The Hub-ready folder: open_clip's layout, loaded by ``open_clip.create_model_and_transforms('local-dir:')``
with its tokenizer, for a uniform and an automatically pruned (padded) student; the model card."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from torch import nn

from compress.export.hub import README_FILE, hub_model, write_hub_folder
from compress.export.model_card import evaluation_tables, training_lines
from compress.export.parity import parity_batch, rendered_samples
from compress.export.source import ExportSource
from compress.models.build import OPEN_CLIP_CONFIG_FILE, OPEN_CLIP_WEIGHTS_FILE
from compress.models.pad import PaddingError
from compress.models.params import parameter_report
from tests.export_models import pruned_student, uniform_student

#: a run's result row as the card reads it (the keys a run writes; values made up)
ROW = {
    "run_id": "abc123", "name": "tiny", "status": "completed", "started_at": "2026-12-02T15:00:00",
    "duration_s": 12.5, "versions": {"torch": "2.14.1"},
    "config": {
        "teacher": {"model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}, "teachers": [], "student": None,
        "inheritance": {"name": "auto", "target_sparsity": 0.5},
        "losses": [{"name": "affinity", "weight": 1.0}], "schedules": {"lr": {"name": "warmup_cosine"}},
        "data": {"train": {"kind": "csv", "path": "/data/cc3m.csv"}},
        "train": {"steps": 100, "batch_size": 64, "accum_steps": 2, "lr": 1e-4}, "stages": [],
    },
    "metrics": {
        "train/steps": 100, "data/samples_seen": 12800, "train/precision": "bf16", "sparsity/achieved": 0.49,
        "sparsity/target": 0.5, "zs/imagenet/top1": 55.123, "zs/imagenet/top5": 80.0, "zs/cifar10/top1": 90.5,
        "ret/coco/i2t_r1": 40.0, "ret/coco/t2i_r1": 30.25, "params/vision": 10, "macs/image": 4_400_000_000,
        "macs/text": 2_900_000_000,
    },
}


def _check_open_clip_load(model: nn.Module, folder: Path) -> None:
    """What a user does: open_clip's own loading of the folder, its transform and tokenizer."""
    loaded, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    images, captions = rendered_samples(4)
    ours_images, ours_tokens = parity_batch(model, 4)
    pixels, tokens = torch.stack([preprocess(i) for i in images]), tokenizer(captions)
    assert torch.allclose(pixels, ours_images, atol=1e-6) and torch.equal(tokens, ours_tokens)
    with torch.no_grad():
        for a, b in ((loaded.eval().encode_image(pixels), model.encode_image(pixels)),
                     (loaded.encode_text(tokens), model.encode_text(tokens))):
            assert (a - b).abs().max() <= 1e-4


def test_uniform_student_folder_loads_in_open_clip(tmp_path: Path) -> None:
    model = uniform_student()
    folder = write_hub_folder(model, tmp_path / "hub", ExportSource("cc-test-student", "tiny-student"))
    assert not folder.padded and folder.max_difference <= 1e-4
    assert {p.name for p in folder.path.iterdir()} == {OPEN_CLIP_CONFIG_FILE, OPEN_CLIP_WEIGHTS_FILE, README_FILE}
    config = json.loads((folder.path / OPEN_CLIP_CONFIG_FILE).read_text())
    assert config["model_cfg"]["text_cfg"]["context_length"] == 16 and "mean" in config["preprocess_cfg"]
    _check_open_clip_load(model, folder.path)
    card = (folder.path / README_FILE).read_text()
    assert card.startswith("---\n") and "library_name: open_clip" in card and "# tiny-student" in card
    assert "not a run directory" in card and "Non-uniform" not in card and "**MACs:**" in card


def test_pruned_student_is_padded_and_loads_in_open_clip(tmp_path: Path) -> None:
    """An automatically pruned student (heads and MLP neurons per layer differ, a layer without heads, one
    without MLP) is padded with zeros: open_clip computes the same embeddings from the folder."""
    model = pruned_student(keep_channels=True)
    assert len(set(model.clip_structure["vision"]["heads"])) > 1
    folder = write_hub_folder(model, tmp_path / "hub", ExportSource("x", "pruned"))
    assert folder.padded and folder.max_difference <= 1e-4
    compact = parameter_report(model)["total"]
    assert folder.stored_params["total"] > compact
    _check_open_clip_load(model, folder.path)
    card = (folder.path / README_FILE).read_text()
    assert "## Non-uniform student" in card and f"{compact / 1e6:.2f}M in the compact form" in card
    heads = ", ".join(map(str, model.clip_structure["vision"]["heads"]))
    assert f"| vision | 64 | {heads} |" in card


def test_a_student_without_uniform_form_is_refused() -> None:
    model = pruned_student()  # residual channels pruned too: a layer keeps more heads than the width holds
    with pytest.raises(PaddingError, match="open_clip cannot hold it|not a multiple"):
        hub_model(model)


def test_card_lines_from_a_run_row() -> None:
    lines = training_lines(ROW)
    assert lines[0] == "- **Teacher:** ViT-B-32 (pretrained: laion2b_s34b_b79k)"
    assert "- **Inheritance:** auto(target_sparsity=0.5)" in lines
    assert "- **Training data:** csv: /data/cc3m.csv" in lines
    assert ("- **Steps:** 100 of batch 64 (x2 accumulation), lr 0.0001, 12800 samples seen, precision bf16"
            in lines)
    assert "- **Sparsity:** 49.0% of the teacher's prunable parameters removed (target 50.0%)" in lines


def test_card_counts_macs_in_billions_past_one() -> None:
    from compress.export.model_card import _count

    assert (_count(4_408_810_000), _count(2_140_032)) == ("4.41G", "2.14M")


def test_evaluation_tables_golden() -> None:
    assert evaluation_tables(ROW["metrics"]) == [
        "### Zero-shot classification (%)", "",
        "| task | top1 | top5 |", "|---|---:|---:|",
        "| imagenet | 55.12 | 80.00 |",
        "| cifar10 | 90.50 |  |", "",
        "### Retrieval (%)", "",
        "| task | i2t_r1 | t2i_r1 |", "|---|---:|---:|",
        "| coco | 40.00 | 30.25 |", "",
    ]


def test_the_hub_folder_leaves_the_callers_model_as_it_was(tmp_path: Path) -> None:
    """A student in training mode keeps its modes; one in bfloat16 keeps its dtype (the folder holds float32)."""
    from safetensors.torch import load_file

    training = uniform_student().train()
    training.transformer.eval()
    modes = [m.training for m in training.modules()]
    write_hub_folder(training, tmp_path / "a", ExportSource("x", "training"))
    assert [m.training for m in training.modules()] == modes
    half = uniform_student().to(torch.bfloat16)
    write_hub_folder(half, tmp_path / "b", ExportSource("x", "half"))
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert {t.dtype for t in load_file(str(tmp_path / "b" / OPEN_CLIP_WEIGHTS_FILE)).values()} == {torch.float32}
