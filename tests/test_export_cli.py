"""``clip-compress export``: bad combinations refused in one line before a model is loaded; a finished run's
student (uniform, or automatically pruned) exported to ONNX (parity-checked) and to a Hub-ready folder."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest

from compress.export.parity import parity_batch, run_onnx
from compress.models import load_model
from compress.models.export import save_model
from compress.recipe import run_id_of
from experiments.cli import main
from experiments.dispatch import dispatch
from tests.export_models import uniform_student
from tests.test_cli_errors import one_line
from tests.test_run_e2e import tiny_config


@pytest.fixture
def model_dir(tmp_path: Path) -> str:
    return str(save_model(uniform_student(), tmp_path / "model"))


@pytest.mark.parametrize("argv, message", [
    ([], "nothing to write; give --onnx DIR, --hub DIR or both"),
    (["--hub", "H", "--batch", "4"], "--batch: only with --onnx DIR"),
    (["--hub", "H", "--towers", "text", "--opset", "18"], "--towers, --opset: only with --onnx DIR"),
    (["--onnx", "O", "--batch", "0"], "--batch 0: a fixed batch size must be at least 1"),
    (["--onnx", "O", "--opset", "17"], "--opset 17: torch's exporter writes opset 18 or newer"),
    (["--onnx", "O", "--towers", "image,audio"], "--towers image,audio: give image, text or image,text"),
    (["--onnx", "O", "--batch", "4", "--parity-images", "3"], "--parity-images 3 with --batch 4"),
    (["--onnx", "O", "--parity-images", "-1"], "--parity-images -1: give 0 (no check) or more"),
    (["--onnx", "O", "--hub", "O"], "--onnx and --hub name the same folder"),
])
def test_bad_combinations_are_one_line(tmp_path, capsys, monkeypatch, model_dir, argv, message) -> None:
    monkeypatch.chdir(tmp_path)
    line = one_line(capsys, ["export", model_dir, *argv])
    assert message in line, line


def test_refusals_before_any_model_is_loaded(tmp_path, capsys, monkeypatch, model_dir) -> None:
    import compress.models

    monkeypatch.setattr(compress.models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert "not empty" in one_line(capsys, ["export", model_dir, "--hub", str(tmp_path / "full")])
    assert "an architecture without weights" in one_line(capsys, ["export", "cc-test-student", "--hub", "h"])
    assert "no such file" in one_line(capsys, ["export", str(tmp_path / "nope.safetensors"), "--hub", "h"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: x\n")
    (run / "result.json").write_text(json.dumps({"status": "failed"}))
    assert "the run did not complete (status: failed)" in one_line(capsys, ["export", str(run), "--hub", "h"])
    with pytest.raises(SystemExit):  # argparse: --batch and --dynamic-batch exclude each other
        main(["export", model_dir, "--onnx", "o", "--batch", "2", "--dynamic-batch"])


def _run(tmp_path: Path, **overrides) -> Path:
    cfg = tiny_config(tmp_path, **overrides)
    (row,) = dispatch([cfg])
    assert row["status"] == "completed", row.get("error")
    return tmp_path / "runs" / f"e2e-{run_id_of(cfg)}"


#: auto inheritance that prunes single MLP neurons but keeps the residual width (so a uniform form exists)
AUTO_PADDABLE = {"name": "auto", "target_sparsity": 0.3, "prune_step": 4, "ramp_steps": 2, "mask_lr": 3.0,
                 "lambda_lr": 5.0, "round_to": 16}
#: auto inheritance that prunes residual channels below the heads a layer keeps (no uniform form)
AUTO_NARROW = {**AUTO_PADDABLE, "target_sparsity": 0.5, "mask_lr": 10.0}
AUTO_TRAIN = {"steps": 6, "batch_size": 8, "lr": 1e-3, "log_every": 1, "progress": False}


def _needs_onnx() -> None:
    for name in ("onnx", "onnxruntime", "onnxscript"):
        pytest.importorskip(name, reason="ONNX export needs the onnx extra: pip install 'clip-compress[onnx]'")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["uniform", "auto"])
def test_a_runs_student_exports_to_onnx_and_a_hub_folder(tmp_path, capsys, kind) -> None:
    _needs_onnx()
    run = _run(tmp_path) if kind == "uniform" else _run(tmp_path, inheritance=AUTO_PADDABLE, student=None,
                                                        train=AUTO_TRAIN)
    student = load_model(str(run / "model"))
    assert (getattr(student, "clip_structure", None) is not None) == (kind == "auto")  # non-uniform
    hub, onnx_dir = tmp_path / "hub", tmp_path / "hub" / "onnx"
    capsys.readouterr()
    assert main(["export", str(run), "--onnx", str(onnx_dir), "--hub", str(hub)]) == 0
    out = capsys.readouterr().out
    assert out.count("wrote ") == 3 and "max |ONNX - PyTorch|" in out and "open_clip loads it" in out
    assert ("padded to a uniform model" in out) == (kind == "auto")
    images, tokens = parity_batch(student, 3)
    for name, inputs, encode in (("image", images, student.encode_image), ("text", tokens, student.encode_text)):
        got = run_onnx(str(onnx_dir / f"{name}_encoder.onnx"), inputs)
        assert abs(got - encode(inputs, normalize=True).detach().numpy()).max() <= 1e-4
    loaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{hub}")
    assert abs(loaded.eval().encode_image(images) - student.encode_image(images)).max() <= 1e-4
    card = (hub / "README.md").read_text()
    result = json.loads((run / "result.json").read_text())
    assert f"# e2e-{result['run_id']}" in card and "- **Teacher:** cc-test-teacher (random initialisation)" in card
    assert f"| cs | {result['metrics']['zs/cs/top1']:.2f} |" in card and "image_encoder.onnx" in card
    assert f"{result['metrics']['macs/image'] / 1e6:.2f}M per image" in card  # tiny: millions
    assert ("## Non-uniform student" in card) == (kind == "auto")


@pytest.mark.slow
def test_a_student_open_clip_cannot_hold_is_refused_before_the_onnx_export(tmp_path, capsys) -> None:
    _needs_onnx()
    run = _run(tmp_path, inheritance=AUTO_NARROW, student=None, train=AUTO_TRAIN)
    line = one_line(capsys, ["export", str(run), "--onnx", str(tmp_path / "onnx"), "--hub", str(tmp_path / "hub")])
    assert line.startswith("clip-compress: error: --hub: this non-uniform student has no uniform open_clip form")
    assert not (tmp_path / "onnx").exists()
    assert main(["export", str(run), "--onnx", str(tmp_path / "onnx"), "--batch", "2"]) == 0  # ONNX alone works
    assert "batch 2" in capsys.readouterr().out


def test_the_onnx_extra_is_declared_and_dev_carries_it() -> None:
    import tomllib

    extras = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert {d.split(">")[0] for d in extras["onnx"]} == {"onnx", "onnxruntime", "onnxscript"}
    assert "clip-compress[onnx]" in extras["dev"] or set(extras["onnx"]) <= set(extras["dev"])
