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
from compress.export.model_card import evaluation_tables, task_list_tables, training_lines
from compress.export.parity import parity_batch, rendered_samples
from compress.export.run_facts import stage_rows, task_list_evals
from compress.export.source import ExportSource
from compress.models.build import OPEN_CLIP_CONFIG_FILE, OPEN_CLIP_WEIGHTS_FILE
from compress.models.pad import PaddingError
from compress.models.params import parameter_report
from compress.result_files import EVAL_RESULTS_FILE, SUMMARY_FILE
from compress.rundir import RUN_EVAL_DIR
from tests.export_models import pruned_student, uniform_student

#: a run's result row as the card reads it (the keys a run writes; values made up, consistent: samples seen =
#: steps x global batch)
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
        "train/steps": 100, "data/samples_seen": 6400, "train/precision": "bf16", "sparsity/achieved": 0.49,
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
    assert ("- **Steps:** 100 of global batch 64 (2 micro-batches per step), lr 0.0001, 6400 samples seen, "
            "precision bf16" in lines)
    metrics = ROW["metrics"]
    assert metrics["data/samples_seen"] == metrics["train/steps"] * ROW["config"]["train"]["batch_size"]
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


def staged_run_dir(root: Path) -> Path:
    """A staged run's folder as the card reads it: two stage rows (the run's row holds the last one's metrics)
    and a task-list evaluation (DataComp's lines and the summary ``clip-compress eval --tasks`` writes)."""
    run_dir = root / "tiny-abc123"
    stages = [("1-first", 100, 64, 2, 0.3), ("2-second", 50, 32, 1, 0.49)]
    for name, steps, batch, accum, sparsity in stages:
        row = {**ROW, "config": {**ROW["config"], "train": {"steps": steps, "batch_size": batch,
                                                            "accum_steps": accum, "lr": 1e-4}},
               "metrics": {"train/steps": steps, "data/samples_seen": steps * batch, "sparsity/achieved": sparsity}}
        (run_dir / "stages" / name).mkdir(parents=True)
        (run_dir / "stages" / name / "result.json").write_text(json.dumps(row))
    (run_dir / "stages" / "notes").mkdir()  # not a stage folder
    folder = run_dir / RUN_EVAL_DIR / "datacomp"
    folder.mkdir(parents=True)
    lines = [{"key": "imagenet1k", "dataset": "ImageNet 1k", "metrics": {"acc1": 0.5, "acc5": 0.8,
                                                                         "main_metric": 0.5}},
             {"key": "flickr", "dataset": "Flickr", "metrics": {"image_retrieval_recall@1": 0.25,
                                                              "text_retrieval_recall@1": 0.25,
                                                              "mean_recall@1": 0.25, "main_metric": 0.25}}]
    (folder / EVAL_RESULTS_FILE).write_text("".join(json.dumps(line) + "\n" for line in lines))
    (folder / SUMMARY_FILE).write_text(json.dumps({"tasks": ["imagenet1k", "flickr"], "mean_main_metric_scored": 0.375,
                                                      "tasks_scored": 2, "tasks_in_list": 3}))
    return run_dir


def test_a_staged_runs_card_sums_its_stages_and_lists_each(tmp_path: Path) -> None:
    run_dir = staged_run_dir(tmp_path)
    stages = stage_rows(run_dir)
    assert [name for name, _ in stages] == ["1-first", "2-second"]
    lines = training_lines(ROW, stages)
    assert "- **Steps:** 150 over 2 stages, 8000 samples seen, precision bf16" in lines  # 100 x 64 + 50 x 32
    assert ("  - stage 1-first: 100 steps of global batch 64 (2 micro-batches per step), lr 0.0001, 6400 samples "
            "seen; sparsity 30.0% of the teacher's prunable parameters removed" in lines)
    assert ("  - stage 2-second: 50 steps of global batch 32, lr 0.0001, 1600 samples seen; sparsity 49.0% of "
            "the teacher's prunable parameters removed" in lines)


def test_the_card_has_the_runs_task_list_table(tmp_path: Path) -> None:
    """From ``RUN_DIR/eval/<list>/``: each task's main metric (named from the line, percent) and the mean."""
    run_dir = staged_run_dir(tmp_path)
    (evaluated,) = task_list_evals(run_dir)
    assert task_list_tables([evaluated]) == [
        "### Task list `datacomp`", "", "| task | data set | main metric | % |", "|---|---|---|---:|",
        "| imagenet1k | ImageNet 1k | acc1 | 50.00 |", "| flickr | Flickr | mean_recall@1 | 25.00 |",
        "| mean over the 2 tasks scored of 3 |  |  | 37.50 |", ""]
    model = uniform_student()
    folder = write_hub_folder(model, tmp_path / "hub", ExportSource("m", "tiny", run_dir, ROW), check=False)
    card = (folder.path / README_FILE).read_text()
    assert "| mean over the 2 tasks scored of 3 |  |  | 37.50 |" in card and "| coco | 40.00 | 30.25 |" in card
    assert "- **Steps:** 150 over 2 stages, 8000 samples seen, precision bf16" in card
