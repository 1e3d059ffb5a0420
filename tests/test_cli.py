"""The command line: list, error messages, eval on an image folder, and a miniature demo."""

import json

import pytest
from PIL import Image

from compress.registry import INHERITANCE, LOSSES, SCHEDULES
from experiments import demo
from experiments.cli import main


def test_list_prints_every_plugin_with_description(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for registry in (LOSSES, INHERITANCE, SCHEDULES):
        for entry in registry.entries():
            line = next(x for x in out.splitlines() if x.strip().startswith(entry.name + " "))
            assert entry.description and entry.description in line
    assert "TinyCLIP-ViT-61M-32-Text-29M" in out
    assert {"affinity", "unimodal_affinity", "feature_distill", "clip"} <= set(LOSSES.names())
    assert {"none", "manual", "auto"} <= set(INHERITANCE.names())


def test_config_errors_are_one_line(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("name: x\ntrain: {lrr: 1.0e-3}\n")
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.lrr" in err[0] and "Did you mean 'lr'" in err[0]
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["eval", "no-such-model-name"]) == 2
    assert "unknown model config" in capsys.readouterr().err


def test_help_on_every_command(capsys):
    for command in ([], ["run"], ["eval"], ["list"], ["demo"]):
        with pytest.raises(SystemExit) as e:
            main([*command, "--help"])
        assert e.value.code == 0
        assert "usage: clip-compress" in capsys.readouterr().out


def test_eval_on_an_image_folder(tmp_path, capsys):
    from compress.models import load_model
    from compress.models.export import save_open_clip

    folder = tmp_path / "val"
    colours = {"red_thing": (255, 0, 0), "green_thing": (0, 255, 0), "blue_thing": (0, 0, 255)}
    for name, rgb in colours.items():
        (folder / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 40), rgb).save(folder / name / f"{i}.png")
    model_dir = save_open_clip(load_model("cc-test-teacher"), tmp_path / "model")
    out_file = tmp_path / "metrics.json"
    assert main(["eval", str(model_dir), "--data", str(folder), "--no-throughput", "--output", str(out_file)]) == 0
    metrics = json.loads(out_file.read_text())
    assert 0.0 <= metrics["zs/val/top1"] <= 100.0
    assert metrics["params/vision"] > 0 and metrics["macs/image"] > 0
    assert "zs/val/top1" in capsys.readouterr().out


def test_miniature_demo_runs_every_student(tmp_path, monkeypatch, capsys):
    tiny = demo.DemoPlan(teacher_steps=3, student_steps=4, batch_size=8, teacher_lr=1e-3, student_lr=1e-3,
                         val_samples=40, train_samples=64)
    monkeypatch.setattr(demo, "QUICK", tiny)
    table = demo.run_demo(quick=True, results_dir=tmp_path / "results", cache_dir=tmp_path / "cache")
    assert list(table.index) == ["teacher", "(a) scratch + CLIP loss", "(b) scratch + affinity",
                                 "(c) manual inheritance + affinity", "(d) auto inheritance + affinity"]
    assert set(table["status"]) == {"completed"}
    lines = (tmp_path / "results" / "quick" / "demo_table.md").read_text().splitlines()
    assert lines[0].startswith("| model") and set(lines[1]) <= set("|:- ")  # a markdown table
    assert len(lines) == 2 + 5 and all(line.startswith("|") for line in lines)
    # the teacher is cached: a second run skips it
    demo.run_demo(quick=True, results_dir=tmp_path / "results", cache_dir=tmp_path / "cache")
    assert "[skip] demo-teacher" in capsys.readouterr().out
