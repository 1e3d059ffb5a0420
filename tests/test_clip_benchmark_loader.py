"""The ``clip_compress`` model type of clip_benchmark: what it loads, what it refuses, the CLI's defaults and
the NumPy 2.4 workaround of clip_benchmark's zero-shot accuracy (its numbers unchanged)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("clip_benchmark", reason="clip_benchmark is in the eval extra (pip install 'clip-compress[eval]')")

from compress.integrations import clip_benchmark as cb  # noqa: E402
from compress.models import ModelLoadError, load_model  # noqa: E402
from compress.models.export import save_open_clip  # noqa: E402


def test_register_makes_the_type_a_cli_choice() -> None:
    import clip_benchmark.cli
    from clip_benchmark.models import MODEL_TYPES, TYPE2FUNC

    cb.register()
    cb.register()
    assert TYPE2FUNC["clip_compress"] is cb.load_clip_compress and MODEL_TYPES.count("clip_compress") == 1
    assert clip_benchmark.cli.MODEL_TYPES is MODEL_TYPES  # the list its --model_type choices are read from


def test_numpy_workaround_keeps_clip_benchmarks_numbers() -> None:
    """clip_benchmark 1.6.2's accuracy fails on NumPy >= 2.4 (float() of a 1-element 1-D array); the
    replacement gives exactly the count of correct samples over n that it computes on older NumPy."""
    from clip_benchmark.metrics import zeroshot_classification

    new_numpy = tuple(int(p) for p in np.__version__.split(".")[:2]) >= (2, 4)
    cb.register()
    assert (zeroshot_classification.accuracy is cb._accuracy) == new_numpy  # replaced only where it fails
    generator = torch.Generator().manual_seed(0)
    logits, target = torch.randn(37, 9, generator=generator), torch.randint(0, 9, (37,), generator=generator)
    top = logits.topk(5, dim=1).indices
    expected = [(top[:, :k] == target.view(-1, 1)).any(dim=1).sum().item() / 37 for k in (1, 5)]
    assert cb._accuracy(logits, target, topk=(1, 5)) == expected  # exact: the same float32 counts over n
    array = np.array([3.0], dtype=np.float32)
    if new_numpy:
        with pytest.raises(TypeError, match="0-dimensional"):
            float(array)  # what clip_benchmark's own accuracy does
    assert float(array[0]) == 3.0


def test_cli_defaults() -> None:
    args = cb.cli_arguments(["eval", "--model", "m"])
    assert args == ["eval", "--model", "m", "--model_type", "clip_compress", "--pretrained", ""]
    assert cb.cli_arguments(["eval", "--model", "m", "--pretrained", "f.pt"]).count("--pretrained") == 1
    assert "--pretrained" not in cb.cli_arguments(["eval", "--model_type=open_clip", "--model", "m"])
    assert "--pretrained" not in cb.cli_arguments(["eval", "--pretrained_model", "a,b"])
    assert cb.cli_arguments(["build", "x.json"]) == ["build", "x.json"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_open_clip(load_model("cc-test-teacher"), tmp_path_factory.mktemp("m") / "model")


def test_refusals_are_one_line_errors(exported: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ModelLoadError, match=r"holding its weights; pass --pretrained ''"):
        cb.load_clip_compress(str(exported), "laion400m_e32")  # clip_benchmark's own default
    with pytest.raises(ModelLoadError, match="cc-test-student: no weights"):
        cb.load_clip_compress("cc-test-student", "")
    with pytest.raises(ModelLoadError, match="--model_cache_dir"):
        cb.load_clip_compress(str(exported), "", cache_dir="cache")
    assert cb.main(["eval", "--model", "cc-test-student", "--dataset", "wds/x", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["clip-compress-benchmark: cc-test-student: no weights (random initialisation); pass --pretrained "
                   "CHECKPOINT or an open_clip tag, or an exported folder / run directory as --model"]


def test_loads_exports_and_checkpoints_with_transform_and_tokenizer(exported: Path) -> None:
    reference = load_model(str(exported))
    model, transform, tokenizer = cb.load_clip_compress(f"local-dir:{exported}", "")
    assert not model.training and tokenizer(["a cat"]).shape == (1, 16)
    from PIL import Image

    image = transform(Image.new("RGB", (50, 40), (200, 10, 30))).unsqueeze(0)
    assert image.shape == (1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.encode_image(image), reference.encode_image(image))


def test_a_run_directory_loads_its_final_model(tmp_path: Path) -> None:
    from test_run_e2e import tiny_config

    from compress.run import run_dir_for, run_experiment

    cfg = tiny_config(tmp_path)
    assert run_experiment(cfg)["status"] == "completed"
    run_dir = run_dir_for(cfg)
    model, _, _ = cb.load_clip_compress(str(run_dir), "")
    reference = load_model(str(run_dir / "model"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values(),
                                                  strict=True))
    with pytest.raises(ModelLoadError, match="pass --pretrained ''"):
        cb.load_clip_compress(str(run_dir), "laion400m_e32")


def test_console_script_and_extra_are_declared() -> None:
    import importlib
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    module, _, name = project["scripts"]["clip-compress-benchmark"].partition(":")
    assert getattr(importlib.import_module(module), name) is cb.main
    extras = project["optional-dependencies"]
    assert any(d.startswith("clip-benchmark") for d in extras["eval"])
    dev = extras["dev"]  # CI installs .[dev]: the eval extra by name or its packages
    assert any(d.startswith("clip-compress[") and "eval" in d for d in dev) or set(extras["eval"]) <= set(dev)


def test_without_clip_benchmark_the_error_names_the_extra(monkeypatch, capsys) -> None:
    for name in ("clip_benchmark", "clip_benchmark.cli", "clip_benchmark.models",
                 "clip_benchmark.metrics.zeroshot_classification"):
        monkeypatch.setitem(sys.modules, name, None)  # import of it raises ImportError
    with pytest.raises(ImportError, match=r'pip install "clip-compress\[eval\]"'):
        cb.register()
    assert cb.main(["eval", "--model", "m"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install "clip-compress[eval]"' in err[0]
