"""ONNX export per tower: parity with PyTorch (ONNX Runtime, within 1e-4 on rendered images and their
captions) for a uniform and an automatically pruned student, fixed and dynamic batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("onnx", reason="ONNX export needs the onnx extra: pip install 'clip-compress[onnx]'")
pytest.importorskip("onnxruntime", reason="ONNX parity needs the onnx extra: pip install 'clip-compress[onnx]'")
pytest.importorskip("onnxscript", reason="torch's ONNX exporter needs onnxscript: pip install 'clip-compress[onnx]'")

import onnx  # noqa: E402
import onnxruntime  # noqa: E402

from compress.export.onnx_export import OnnxExportError, export_onnx, export_tower, require_onnx  # noqa: E402
from compress.export.parity import PARITY_ATOL, ParityError, check_parity, parity_batch, run_onnx  # noqa: E402
from tests.export_models import pruned_student, uniform_student  # noqa: E402


@pytest.fixture(scope="module")
def pruned() -> nn.Module:
    return pruned_student()


def _dims(path: Path) -> dict[str, list]:
    graph = onnx.load(str(path)).graph
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.output]}


def test_parity_batch_is_rendered_images_and_their_captions(pruned: nn.Module) -> None:
    images, tokens = parity_batch(pruned, 5)
    assert images.shape == (5, 3, 32, 32) and tokens.shape == (5, 16) and tokens.dtype == torch.long
    assert images.std() > 0.1  # real pixels, not a constant
    assert len(set(tokens.argmax(-1).tolist())) > 1  # end-of-text tokens at different positions
    again = parity_batch(pruned, 5)
    assert torch.equal(images, again[0]) and torch.equal(tokens, again[1])


def test_pruned_student_dynamic_batch_matches_pytorch(pruned: nn.Module, tmp_path: Path) -> None:
    """The non-uniform student (a layer without heads, one without MLP, a pruned residual width), both towers,
    one dynamic-batch file each, run at batch 8, 1 and 3; the text tower pools at the end-of-text token."""
    structure = pruned.clip_structure
    assert 0 in structure["vision"]["heads"] and 0 in structure["vision"]["mlp_width"]
    assert len(set(structure["text"]["heads"])) > 1 and structure["vision"]["width"] < 64
    files = export_onnx(pruned, tmp_path)
    assert [f.path.name for f in files] == ["image_encoder.onnx", "text_encoder.onnx"]
    assert _dims(files[0].path) == {"pixel_values": ["batch", 3, 32, 32], "image_embeds": ["batch", 32]}
    assert _dims(files[1].path) == {"input_ids": ["batch", 16], "text_embeds": ["batch", 32]}
    images, tokens = parity_batch(pruned, 8)
    found = check_parity(pruned, files, images, tokens)
    assert set(found) == {"image", "text"} and max(found.values()) <= PARITY_ATOL
    with torch.no_grad():
        expected = pruned.encode_text(tokens[2:5], normalize=True).numpy()
    assert abs(run_onnx(str(files[1].path), tokens[2:5]) - expected).max() <= PARITY_ATOL
    _check_text_pools_where_the_ids_say(pruned, files[1].path)


def _check_text_pools_where_the_ids_say(model: nn.Module, path: Path) -> None:
    """The end-of-text position is read from the ids at run time (ArgMax in the graph), not fixed at trace
    time: moving it changes the ONNX output exactly as it changes PyTorch's."""
    assert "ArgMax" in {n.op_type for n in onnx.load(str(path)).graph.node}
    ids = torch.randint(1, 49406, (2, 16), generator=torch.Generator().manual_seed(0))
    ids[:, 10], ids[:, 11:] = 49407, 0  # end-of-text at position 10
    ids[1, 3], ids[1, 4:] = 49407, 0  # row 1: the same text cut short, end-of-text at position 3
    out = run_onnx(str(path), ids)
    with torch.no_grad():
        expected = model.encode_text(ids, normalize=True).numpy()
    assert abs(out - expected).max() <= PARITY_ATOL and abs(out[0] - out[1]).max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["uniform", "pruned"])
def test_fixed_batch_matches_and_refuses_other_sizes(kind: str, pruned: nn.Module, tmp_path: Path) -> None:
    model = uniform_student() if kind == "uniform" else pruned
    files = export_onnx(model, tmp_path, batch_size=4)
    assert _dims(files[0].path)["pixel_values"] == [4, 3, 32, 32] and _dims(files[1].path)["input_ids"] == [4, 16]
    images, tokens = parity_batch(model, 4)
    assert max(check_parity(model, files, images, tokens).values()) <= PARITY_ATOL
    with pytest.raises(onnxruntime.capi.onnxruntime_pybind11_state.InvalidArgument):
        run_onnx(str(files[0].path), images[:2])
    with pytest.raises(OnnxExportError, match="fixed batch 4"):
        check_parity(model, files, images[:2], tokens[:2])


@pytest.mark.slow
def test_uniform_student_dynamic_batch_matches_pytorch_and_records_metadata(tmp_path: Path) -> None:
    model = uniform_student()
    files = export_onnx(model, tmp_path)
    images, tokens = parity_batch(model, 8)
    assert max(check_parity(model, files, images, tokens).values()) <= PARITY_ATOL
    meta = {p.key: p.value for p in onnx.load(str(files[0].path)).metadata_props}
    assert meta["clip_compress.tower"] == "image" and meta["clip_compress.batch"] == "dynamic"
    assert json.loads(meta["clip_compress.preprocess_cfg"])["mean"] == list(model.visual.preprocess_cfg["mean"])
    assert abs(float(meta["clip_compress.logit_scale"]) - model.logit_scale.exp().item()) < 1e-4
    text_meta = {p.key: p.value for p in onnx.load(str(files[1].path)).metadata_props}
    assert json.loads(text_meta["clip_compress.tokenizer"])["context_length"] == 16
    assert files[0].bytes == files[0].path.stat().st_size > 4 * sum(p.numel() for p in model.visual.parameters())


@pytest.mark.slow
def test_unnormalized_export_and_a_parity_failure_is_reported(pruned: nn.Module, tmp_path: Path) -> None:
    file = export_tower(pruned, "image", tmp_path / "raw.onnx", normalize=False)
    images, tokens = parity_batch(pruned, 3)
    assert check_parity(pruned, [file], images, tokens, normalize=False)["image"] <= PARITY_ATOL
    norms = torch.from_numpy(run_onnx(str(file.path), images)).norm(dim=-1)
    assert not torch.allclose(norms, torch.ones(3))
    with pytest.raises(ParityError, match="differs from PyTorch"):
        check_parity(pruned, [file], images, tokens, normalize=True)  # normalised PyTorch against raw ONNX


def test_bad_options_are_refused(pruned: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(OnnxExportError, match="unknown"):
        export_onnx(pruned, tmp_path, towers=("audio",))
    with pytest.raises(OnnxExportError, match="at least 1"):
        export_tower(pruned, "image", tmp_path / "x.onnx", batch_size=0)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(OnnxExportError, match=r"onnxscript: pip install \"clip-compress\[onnx\]\""):
        require_onnx()


@pytest.mark.slow
def test_resnet_image_tower_matches_pytorch(tmp_path: Path) -> None:
    """ModifiedResNet (attention pooling through ``F.multi_head_attention_forward``) exports too."""
    from compress.models import load_model

    torch.manual_seed(0)
    model = load_model("cc-test-rn-student")
    files = export_onnx(model, tmp_path, towers=("image",))
    images, tokens = parity_batch(model, 4)
    assert check_parity(model, files, images, tokens)["image"] <= PARITY_ATOL


@pytest.mark.slow
def test_weights_past_the_protobuf_limit_go_to_external_data(pruned: nn.Module, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import compress.export.onnx_export as onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)  # as if the tower passed 1.9 GB
    file = export_tower(pruned, "image", tmp_path / "image_encoder.onnx")
    data = tmp_path / "image_encoder.onnx.data"
    assert data.is_file() and file.path.stat().st_size < data.stat().st_size
    assert file.bytes == file.path.stat().st_size + data.stat().st_size
    images, tokens = parity_batch(pruned, 2)
    assert check_parity(pruned, [file], images, tokens)["image"] <= PARITY_ATOL


def _state(model: nn.Module) -> tuple[list[bool], dict[str, torch.dtype], dict[str, torch.Tensor]]:
    return ([m.training for m in model.modules()], {k: v.dtype for k, v in model.state_dict().items()},
            {k: v.clone() for k, v in model.state_dict().items()})


def test_export_and_parity_leave_the_callers_model_as_it_was(tmp_path: Path) -> None:
    """A model in training mode (one submodule in eval mode) and one in bfloat16: exported in float32 and eval
    mode, the caller's model keeps its modes, dtypes and weights."""
    training = uniform_student().train()
    training.visual.transformer.resblocks[0].eval()
    before = _state(training)
    files = [export_tower(training, "image", tmp_path / "image.onnx")]
    check_parity(training, files, *parity_batch(training, 2))
    after = _state(training)
    assert after[:2] == before[:2] and all(torch.equal(after[2][k], v) for k, v in before[2].items())
    half = uniform_student().to(torch.bfloat16)
    before = _state(half)
    file = export_tower(half, "text", tmp_path / "text.onnx")
    assert onnx.load(str(file.path)).graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert _state(half)[:2] == before[:2] and not half.training
