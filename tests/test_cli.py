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


def test_list_name_prints_the_parameters_their_defaults_and_the_docstring(capsys):
    assert main(["list", "affinity"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("losses 'affinity' (strategies.losses.affinity.AffinityMimicking)")
    for line in ("weight: float = 1.0", "weight_i2t: float = 0.5", "weight_t2i: float = 0.5",
                 "scale: float | str = 50.0", "TinyCLIP affinity mimicking"):
        assert f"  {line}" in out, line
    assert main(["list", "inheritance", "auto"]) == 0
    out = capsys.readouterr().out
    assert "  prune_step: int = 3000" in out and "  total_steps: int | None  (set by the engine: train.steps)" in out
    assert main(["list", "warmup_cosine"]) == 0
    assert "  base_value: float  (set by the engine: train.lr" in capsys.readouterr().out
    assert main(["list", "affinty"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no plug-in 'affinty'. Did you mean 'affinity'" in err[0]
    assert main(["list", "losses", "auto"]) == 2  # auto is an inheritance strategy
    assert "no plug-in 'auto' in losses" in capsys.readouterr().err


def test_config_mistakes_fail_before_torch_is_imported(tmp_path):
    """A YAML mistake (a key twice, an unknown key, a wrong --set) is reported without importing torch,
    which takes seconds; checked in a fresh interpreter for each command."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    config = root / "experiments" / "configs" / "tiny-test.yaml"
    twice = tmp_path / "twice.yaml"
    twice.write_text(config.read_text() + "name: again\n")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(config.read_text().replace("lr: 1e-3", "lrate: 1e-3"))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"name: s\nbase: {config}\naxes:\n  train.lr: [1.0e-3]\n  train.lr: [2.0e-3]\n")
    commands = {"duplicate key 'name'": ["run", str(twice)], "unknown key 'train.lrate'": ["run", str(unknown)],
                "--set train.stepz=2": ["run", str(config), "--set", "train.stepz=2"],
                "duplicate key 'axes.train.lr'": ["sweep", str(sweep), "--dry-run"]}
    for message, argv in commands.items():
        code = ("import sys\nfrom experiments.cli import main\n"
                f"code = main({argv!r})\nprint(code, 'torch' in sys.modules)")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                                env={**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"})
        assert result.stdout.split() == ["2", "False"], (argv, result.stdout, result.stderr)
        assert message in result.stderr


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
    for command in ([], ["run"], ["sweep"], ["eval"], ["list"], ["demo"]):
        with pytest.raises(SystemExit) as e:
            main([*command, "--help"])
        assert e.value.code == 0
        assert "usage: clip-compress" in capsys.readouterr().out


def test_eval_on_an_image_folder(tmp_path, capsys):
    """``clip-compress eval`` on an exported model and an image folder gives the numbers of
    evaluating the same model in-process on the same images, prompts and transform."""
    import open_clip
    import torch

    from compress.evaluation import ZeroShotTask, count_macs, evaluate_model
    from compress.models import load_model
    from compress.models.export import save_open_clip
    from compress.models.params import parameter_report

    folder = tmp_path / "val"
    colours = {"blue_thing": (0, 0, 255), "green_thing": (0, 255, 0), "red_thing": (255, 0, 0)}  # sorted
    for name, rgb in colours.items():
        (folder / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 40), tuple(min(255, c + 20 * i) for c in rgb)).save(folder / name / f"{i}.png")
    torch.manual_seed(0)
    model = load_model("cc-test-teacher")
    model_dir = save_open_clip(model, tmp_path / "model")
    out_file = tmp_path / "metrics.json"
    assert main(["eval", str(model_dir), "--data", str(folder), "--no-throughput", "--output", str(out_file)]) == 0
    metrics = json.loads(out_file.read_text())
    assert "zs/val/top1" in capsys.readouterr().out

    transform = open_clip.image_transform(32, is_train=False)
    images = torch.stack([transform(Image.open(folder / c / f"{i}.png")) for c in colours for i in range(3)])
    labels = torch.arange(3).repeat_interleave(3)
    templates = ["a photo of a {}.", "a photo of the {}.", "an image of a {}.", "a picture of a {}."]
    task = ZeroShotTask("val", [(images, labels)], ["blue thing", "green thing", "red thing"], templates)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.clip_cfg["text_cfg"]["context_length"])
    expected = evaluate_model(model.eval(), tokenizer, zero_shot_tasks=[task], measure_throughput=False)
    assert metrics == pytest.approx(expected, rel=0, abs=1e-9)
    assert set(metrics) == set(expected) and "zs/val/top1" in metrics
    assert {k: metrics[f"params/{k}"] for k in parameter_report(model)} == parameter_report(model)
    assert metrics["macs/image"] == count_macs(model)["macs_image"]


def test_eval_run_dir_reproduces_its_result_json(tmp_path, capsys):
    """``clip-compress eval RUN_DIR`` evaluates the run's exported model on the run's own
    evaluation config: the same numbers as the run's result.json."""
    from test_run_e2e import tiny_config

    from compress.run import run_dir_for, run_experiment

    cfg = tiny_config(tmp_path)
    row = run_experiment(cfg)
    assert row["status"] == "completed", row.get("error")
    run_dir = run_dir_for(cfg)
    out_file = tmp_path / "again.json"
    assert main(["eval", str(run_dir), "--output", str(out_file)]) == 0
    again = json.loads(out_file.read_text())
    recorded = json.loads((run_dir / "result.json").read_text())["metrics"]
    assert {"zs/cs/top1", "zs/cs/top1_heldout", "ret/val/i2t_r1", "params/total", "macs/image"} <= set(again)
    assert again == {k: recorded[k] for k in again}
    capsys.readouterr()
    (run_dir / "model").rename(run_dir / "gone")
    assert main(["eval", str(run_dir)]) == 2
    assert "has no exported model" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_staged_run_dir_evaluates_the_last_stages_model(tmp_path, capsys):
    """A staged run's model is its last stage's (``stages/<k>-<name>/model``): ``clip-compress eval
    RUN_DIR`` finds it and gives the numbers of the run's result.json (it looked only in RUN_DIR/model)."""
    from test_run_e2e import tiny_config

    from compress.run import run_dir_for, run_experiment

    cfg = tiny_config(tmp_path, train={"steps": 1, "batch_size": 8, "lr": 1e-3, "log_every": 1, "progress": False},
                      stages=[{"name": "first"}, {"name": "second", "student": {"model": "cc-test-student"}}])
    row = run_experiment(cfg)
    assert row["status"] == "completed", row.get("error")
    run_dir = run_dir_for(cfg)
    assert not (run_dir / "model").exists() and (run_dir / "stages" / "1-second" / "model").is_dir()
    out_file = tmp_path / "again.json"
    assert main(["eval", str(run_dir), "--output", str(out_file)]) == 0
    again = json.loads(out_file.read_text())
    recorded = json.loads((run_dir / "result.json").read_text())["metrics"]
    assert {"zs/cs/top1", "ret/val/i2t_r1", "params/total"} <= set(again)
    assert again == {k: recorded[k] for k in again}
    capsys.readouterr()
    (run_dir / "stages" / "1-second" / "model").rename(run_dir / "gone")
    assert main(["eval", str(run_dir)]) == 2
    assert "has no exported model (stages/1-second/model/)" in capsys.readouterr().err


def _eval_error_cases(tmp_path):
    import torch

    a_file = tmp_path / "pairs.txt"
    a_file.write_text("x")
    cases = [
        (["eval", str(tmp_path / "no-such" / "model")], f"no such file or folder: {tmp_path / 'no-such' / 'model'}"),
        (["eval", "./student.pt"], "no such file or folder: ./student.pt"),
        (["eval", "cc-test-teacher", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["eval", "cc-test-teacher", "--kind", "folder", "--data", str(a_file)], "needs a folder"),
        (["eval", "cc-test-teacher", "--data", str(tmp_path / "missing")], "no such file or folder"),
        (["eval", "cc-test-teacher", "--device", "gpu"], "--device gpu"),
        (["eval", "cc-test-teacher", "--kind", "folder"], "--kind folder needs --data PATH"),
    ]
    if not torch.cuda.is_available():
        cases.append((["eval", "cc-test-teacher", "--device", "cuda"], "--device cuda: "))
    return cases


def test_eval_errors_are_one_line(tmp_path, capsys):
    for argv, message in _eval_error_cases(tmp_path):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("clip-compress: error: ") and message in err[0], (argv, err)


@pytest.mark.slow
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
    # made by analysis.tables: a column per metric, the best per column in bold
    assert lines[0] == ("| model | zero-shot top-1 | top-1 seen pairs | top-1 held-out pairs | R@1 i2t | R@1 t2i | "
                        "params (w/o token emb.) | pairs/s | train s |")
    assert "**" in "".join(lines[2:])
    assert len(lines) == 2 + 5 and all(line.startswith("|") for line in lines)
    # the teacher is cached: a second run skips it
    demo.run_demo(quick=True, results_dir=tmp_path / "results", cache_dir=tmp_path / "cache")
    assert "[skip] demo-teacher" in capsys.readouterr().out
