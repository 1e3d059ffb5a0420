"""End-to-end runs on tiny towers and the embedded data set (a few CPU steps each)."""

import json

import open_clip
import pytest
import torch

from compress.recipe import config_from_dict, run_id_of
from compress.run import run_experiment


def tiny_config(tmp_path, **overrides):
    data = {
        "name": "e2e",
        "teacher": {"model": "cc-test-teacher", "random_init": True},
        "student": {"model": "cc-test-student"},
        "inheritance": {"name": "manual"},
        "losses": [{"name": "affinity", "weight": 1.0}],
        "schedules": {"lr": {"name": "warmup_cosine", "warmup_steps": 1}},
        "data": {"train": {"kind": "synthetic", "num_samples": 64}, "val": {"kind": "synthetic", "num_samples": 32}},
        "train": {"steps": 2, "batch_size": 8, "lr": 1e-3, "log_every": 1, "progress": False},
        "eval": {"zero_shot": [{"name": "cs", "kind": "synthetic", "task": "color_shape"}], "batch_size": 64,
                 "throughput": False},
        "output": {"dir": str(tmp_path / "runs")},
    }
    for key, value in overrides.items():
        data[key] = value
    return config_from_dict(data)


@pytest.mark.parametrize("inheritance", ["none", "manual"])
def test_tiny_run_writes_result_metrics_and_model(tmp_path, inheritance):
    cfg = tiny_config(tmp_path, inheritance={"name": inheritance})
    row = run_experiment(cfg)
    assert row["status"] == "completed", row.get("error")
    run_dir = tmp_path / "runs" / f"e2e-{run_id_of(cfg)}"
    on_disk = json.loads((run_dir / "result.json").read_text())
    assert on_disk["run_id"] == run_id_of(cfg) and on_disk["status"] == "completed"
    metrics = on_disk["metrics"]
    assert {"started_at", "duration_s"} <= set(on_disk) and torch.__version__.startswith(on_disk["versions"]["torch"])
    for key in ("train/nonfinite_steps", "train/samples_per_s", "data/bad_fraction", "train/precision"):
        assert key in on_disk["metrics"], key
    for key in ("zs/cs/top1", "zs/cs/top1_heldout", "ret/val/i2t_r1", "params/vision", "macs/image",
                "train/affinity_i2t", "data/bad_samples"):
        assert key in metrics, key
    assert metrics["train/steps"] == 2
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    assert all("loss/affinity_i2t" in r and "lr" in r for r in lines)
    assert not (run_dir / "checkpoints").exists()  # removed once the run completed (output.keep_checkpoints)
    assert on_disk["config"]["inheritance"]["name"] == inheritance


def test_exported_student_loads_in_open_clip_with_identical_outputs(tmp_path):
    from compress.models import load_model

    cfg = tiny_config(tmp_path)
    row = run_experiment(cfg)
    folder = row["metrics"]["export/path"]
    ours = load_model(folder)
    theirs = open_clip.create_model("local-dir:" + folder)
    theirs.eval()
    images = torch.randn(3, 3, 32, 32)
    texts = open_clip.tokenizer.SimpleTokenizer(context_length=16)(["a red circle", "a blue star", "x"])
    with torch.no_grad():
        assert torch.allclose(ours.encode_image(images), theirs.encode_image(images), atol=1e-6)
        assert torch.allclose(ours.encode_text(texts), theirs.encode_text(texts), atol=1e-6)


def test_failed_run_writes_failed_row(tmp_path):
    # the student is larger than its source: manual inheritance refuses it during the run
    cfg = tiny_config(tmp_path, teacher={"model": "cc-test-student", "random_init": True},
                      student={"model": "cc-test-teacher"})
    row = run_experiment(cfg)
    assert row["status"] == "failed"
    on_disk = json.loads((tmp_path / "runs" / f"e2e-{run_id_of(cfg)}" / "result.json").read_text())
    assert on_disk["status"] == "failed"
    assert on_disk["error"].startswith("InheritanceError") and "student" in on_disk["error"]
    assert "Traceback" in on_disk["traceback"]
    assert on_disk["run_id"] == run_id_of(cfg)


def test_auto_inheritance_run_prunes_exports_and_reports(tmp_path):
    from compress.models import load_model
    from experiments.dispatch import dispatch

    # 3 steps of masks drop about one MLP neuron per layer: round_to 8 (the default) would keep them all
    auto = {"name": "auto", "target_sparsity": 0.5, "prune_step": 3, "ramp_steps": 2, "mask_lr": 0.5,
            "lambda_lr": 1.0, "round_to": 1}
    cfg = tiny_config(tmp_path, inheritance=auto, student=None, train={
        "steps": 5, "batch_size": 8, "lr": 1e-3, "log_every": 1, "progress": False})
    (row,) = dispatch([cfg])
    assert row["status"] == "completed", row.get("error")
    run_dir = tmp_path / "runs" / f"e2e-{run_id_of(cfg)}"
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["inherit/pruned"] == 0.0 and lines[-1]["inherit/pruned"] == 1.0
    assert "inherit/expected_sparsity/all" in lines[0] and "inherit/target_sparsity" in lines[0]
    teacher = load_model("cc-test-teacher")
    exported = load_model(row["metrics"]["export/path"])
    assert sum(p.numel() for p in exported.parameters()) < sum(p.numel() for p in teacher.parameters())
    for name in ("structure.json", "structure.md", "structure.png"):
        assert (run_dir / name).is_file(), name


def test_a_manual_students_structure_report_is_against_its_teacher(tmp_path):
    """cc-test-student inherits from cc-test-teacher: vision width 48 of 64, text 2 of its 4 layers (source
    layers 0 and 2, TinyCLIP's interval rule). Its report shows what it kept of the teacher, not of its own
    config (which read 100% kept, width 48 / 48), and is titled with the run and its sparsity."""
    from analysis.structure_report import load_structure
    from experiments.dispatch import dispatch

    cfg = tiny_config(tmp_path)
    (row,) = dispatch([cfg])
    assert row["status"] == "completed", row.get("error")
    run_dir = tmp_path / "runs" / f"e2e-{run_id_of(cfg)}"
    structure = load_structure(run_dir)
    vision, text = structure["vision"], structure["text"]
    assert (vision["width"], vision["full"]["width"]) == (48, 64)
    assert text.get("layers") == [0, 2] and text["full"]["heads"] == [4, 4, 4, 4]
    table = (run_dir / "structure.md").read_text()
    assert "### vision: width 48 / 64, heads 12 / 16, MLP neurons 768 / 1024" in table
    assert "| 0 | 3 / 4 | 75% | 192 / 256 | 75% |" in table  # a vision layer: 3 of the teacher's 4 heads
    assert "### text: width 64 / 64, layers 2 / 4, heads 8 / 16, MLP neurons 512 / 1024" in table
    assert "| 1 | 0 / 4 (layer dropped) | 0% | 0 / 256 | 0% |" in table
    sparsity = row["metrics"]["sparsity/achieved"]
    assert 0.3 < sparsity < 0.7
    title = json.loads((run_dir / "structure.json").read_text())["title"]
    assert title == f"{run_dir.name}: {sparsity:.1%} of the teacher pruned"
    assert table.startswith(f"## {title}\n")
    assert (run_dir / "structure.png").stat().st_size > 0


def test_skip_completed_and_force(tmp_path, capsys):
    from experiments.dispatch import dispatch

    cfg = tiny_config(tmp_path)
    first = dispatch([cfg])
    assert first[0]["status"] == "completed"
    again = dispatch([cfg])
    assert again[0]["status"] == "skipped"
    assert "[skip]" in capsys.readouterr().out
