"""load_model's resolution paths, safe checkpoint reading, and export to open_clip's layout.

No network: only test configs and random weights; pretrained tags are never downloaded.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from torch import nn

from compress.masks import attach_masks
from compress.models import HeadAttention, ModelLoadError, get_model_config, load_model
from compress.models.export import checkpoint_metadata, save_open_clip, save_safetensors
from compress.models.factory import check_activation

TEACHER = "cc-test-teacher"


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    torch.manual_seed(0)
    return load_model(TEACHER)


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 32, 32, generator=gen), torch.randint(0, 49408, (2, 16), generator=gen)


def assert_same_outputs(a: nn.Module, b: nn.Module, inputs: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, tokens = inputs
    with torch.no_grad():
        assert (a.encode_image(images) - b.encode_image(images)).abs().max().item() < 1e-6
        assert (a.encode_text(tokens) - b.encode_text(tokens)).abs().max().item() < 1e-6


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# --- resolution paths ---------------------------------------------------------------------


def test_shipped_config_name(teacher: nn.Module) -> None:
    assert teacher.clip_name == TEACHER
    assert teacher.clip_cfg == {**get_model_config(TEACHER), "quick_gelu": False}
    assert not teacher.training
    assert isinstance(teacher.visual.transformer.resblocks[0].attn, HeadAttention)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in teacher.modules())
    assert not isinstance(load_model(TEACHER, convert=False).transformer.resblocks[0].attn, HeadAttention)


def test_name_with_slash_and_quickgelu_suffix() -> None:
    assert get_model_config("ViT-B/32") == get_model_config("ViT-B-32")
    assert get_model_config("ViT-B-32-quickgelu")["quick_gelu"] is True


@pytest.mark.parametrize("wrapped", [False, True])
def test_config_json_file(tmp_path: Path, teacher: nn.Module, wrapped: bool) -> None:
    cfg = get_model_config(TEACHER)
    data = {"model_cfg": cfg, "preprocess_cfg": {"size": 32}} if wrapped else cfg
    path = tmp_path / "model.json"
    path.write_text(json.dumps(data))
    model = load_model(str(path))
    assert model.clip_name == "model"
    assert shapes(model) == shapes(teacher)
    assert model.clip_cfg["quick_gelu"] is False


def test_config_json_with_pretrained_file(tmp_path: Path, teacher: nn.Module, inputs) -> None:
    path = tmp_path / "model.json"
    path.write_text(json.dumps(get_model_config(TEACHER)))
    weights = tmp_path / "w.pt"
    torch.save(teacher.state_dict(), weights)
    assert_same_outputs(load_model(str(path), pretrained=str(weights)), teacher, inputs)


def test_not_a_model_config(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('{"foo": 1}')
    with pytest.raises(ModelLoadError, match="vision_cfg"):
        load_model(str(path))
    path.write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_model(str(path))


def test_self_describing_safetensors(tmp_path: Path, teacher: nn.Module, inputs) -> None:
    path = tmp_path / "student.safetensors"
    save_safetensors(teacher.state_dict(), path, checkpoint_metadata(teacher))
    model = load_model(str(path))
    assert model.clip_cfg == teacher.clip_cfg
    assert_same_outputs(model, teacher, inputs)


def test_safetensors_without_metadata_needs_an_architecture(tmp_path: Path, teacher: nn.Module, inputs) -> None:
    path = tmp_path / "plain.safetensors"
    save_safetensors(teacher.state_dict(), path)
    with pytest.raises(ModelLoadError, match="carries no model config"):
        load_model(str(path))
    assert_same_outputs(load_model(TEACHER, pretrained=str(path)), teacher, inputs)


@pytest.mark.parametrize("layout", ["plain", "state_dict", "ddp"])
def test_pt_state_dict_with_pretrained(tmp_path: Path, teacher: nn.Module, inputs, layout: str) -> None:
    state = teacher.state_dict()
    if layout == "ddp":
        state = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / "w.pt"
    torch.save({"state_dict": state, "epoch": 3} if layout == "state_dict" else state, path)
    assert_same_outputs(load_model(TEACHER, pretrained=str(path)), teacher, inputs)
    with pytest.raises(ModelLoadError, match="carries no model config"):
        load_model(str(path))


class _Payload:
    """Unpickling this would run code (it writes a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_pickled_object_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": _Payload(marker)}}, path)
    with pytest.raises(ModelLoadError, match="refused to load with weights_only=True") as info:
        load_model(TEACHER, pretrained=str(path))
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)
    assert "global" in str(info.value).lower()  # torch names the blocked global
    assert not marker.exists()


def test_corrupt_checkpoints(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(str(bad))
    bad_pt = tmp_path / "bad.pt"
    bad_pt.write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="weights_only"):
        load_model(TEACHER, pretrained=str(bad_pt))
    empty = tmp_path / "empty.pt"
    torch.save({}, empty)
    with pytest.raises(ModelLoadError, match="not a state dict"):
        load_model(TEACHER, pretrained=str(empty))


def test_quick_gelu_weights_refused_in_gelu_config(tmp_path: Path) -> None:
    quick = load_model(TEACHER, force_quick_gelu=True)
    assert quick.clip_cfg["quick_gelu"] is True
    assert any(isinstance(m, QuickGELU) for m in quick.modules())
    path = tmp_path / "quick.safetensors"
    save_safetensors(quick.state_dict(), path, checkpoint_metadata(quick))
    with pytest.raises(ModelLoadError, match="QuickGELU"):
        load_model(TEACHER, pretrained=str(path))
    assert load_model(str(path)).clip_cfg["quick_gelu"] is True  # self-described: fine
    assert load_model(TEACHER, pretrained=str(path), force_quick_gelu=True).clip_cfg["quick_gelu"]


def test_gelu_weights_refused_when_quick_gelu_forced(tmp_path: Path, teacher: nn.Module) -> None:
    path = tmp_path / "gelu.safetensors"
    save_safetensors(teacher.state_dict(), path, checkpoint_metadata(teacher))
    with pytest.raises(ModelLoadError, match="trained with GELU but the model config uses QuickGELU"):
        load_model(str(path), force_quick_gelu=True)


def test_weights_that_do_not_fit(tmp_path: Path) -> None:
    student = load_model("cc-test-student")
    path = tmp_path / "student.pt"
    torch.save(student.state_dict(), path)
    with pytest.raises(ModelLoadError, match="do not fit") as info:
        load_model(TEACHER, pretrained=str(path))
    assert "missing" in str(info.value) and "shape" in str(info.value)


def test_other_image_size_is_not_silently_resized(tmp_path: Path, teacher: nn.Module) -> None:
    cfg = get_model_config(TEACHER)
    cfg["vision_cfg"]["image_size"] = 64
    path = tmp_path / "big.json"
    path.write_text(json.dumps(cfg))
    weights = tmp_path / "w.safetensors"
    save_safetensors(teacher.state_dict(), weights)
    with pytest.raises(ModelLoadError, match="visual.positional_embedding"):
        load_model(str(path), pretrained=str(weights))


def test_unknown_tag_lists_known_tags() -> None:
    with pytest.raises(ModelLoadError, match="laion2b_s34b_b79k"):
        load_model("ViT-B-32@no_such_tag")
    with pytest.raises(ModelLoadError, match=r"Known tags: \(none\)"):
        load_model(f"{TEACHER}@no_such_tag")


def test_unknown_name_suggests_close_match() -> None:
    with pytest.raises(ModelLoadError, match="Did you mean 'ViT-B-32'"):
        load_model("ViT-B-33")
    with pytest.raises(ModelLoadError, match="cc-test-teacher"):
        load_model("cc-test-teachr")


def test_missing_files(tmp_path: Path) -> None:
    for missing in ("nope.safetensors", "nope.pt", "nope.json"):
        with pytest.raises(ModelLoadError, match="not found"):
            load_model(str(tmp_path / missing))
    with pytest.raises(ModelLoadError, match="checkpoint not found"):
        load_model(TEACHER, pretrained=str(tmp_path / "nope.pt"))
    with pytest.raises(ModelLoadError, match="no open_clip_config.json"):
        load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="not found"):
        load_model("local-dir:" + str(tmp_path / "no_dir"))


def test_tag_and_pretrained_together_refused() -> None:
    with pytest.raises(ModelLoadError, match="do not also set pretrained"):
        load_model("ViT-B-32@openai", pretrained="laion2b_s34b_b79k")


# --- pretrained tags: open_clip's own loading, activation checked first (no download) -----


def test_tag_activation_mismatch_is_refused() -> None:
    tag_cfg = open_clip.get_pretrained_cfg("ViT-B-32", "openai")
    assert tag_cfg["quick_gelu"] is True
    with pytest.raises(ModelLoadError, match="QuickGELU"):
        check_activation(get_model_config("ViT-B-32"), tag_cfg, "ViT-B-32@openai")
    check_activation(get_model_config("ViT-B-32-quickgelu"), tag_cfg, "ViT-B-32-quickgelu@openai")
    check_activation(
        get_model_config("ViT-B-32"), open_clip.get_pretrained_cfg("ViT-B-32", "laion2b_s34b_b79k"), "x"
    )


@pytest.fixture
def fake_create_model(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict]]:
    """Replace open_clip.create_model by a recorder that builds the tiny teacher, unloaded."""
    calls: list[tuple[str, dict]] = []
    real = open_clip.create_model

    def fake(name: str, **kwargs) -> nn.Module:
        calls.append((name, kwargs))
        return real(TEACHER)

    monkeypatch.setattr(open_clip, "create_model", fake)
    return calls


def test_tag_uses_open_clip_create_model(fake_create_model: list[tuple[str, dict]]) -> None:
    model = load_model("ViT-B/32@laion2b_s34b_b79k")
    assert fake_create_model == [("ViT-B-32", {"pretrained": "laion2b_s34b_b79k", "force_quick_gelu": False})]
    assert model.clip_name == "ViT-B-32" and model.clip_cfg["quick_gelu"] is False
    assert isinstance(model.transformer.resblocks[0].attn, HeadAttention)
    load_model("ViT-B-32", pretrained="openai", force_quick_gelu=True)
    assert fake_create_model[-1] == ("ViT-B-32", {"pretrained": "openai", "force_quick_gelu": True})


def test_tag_mismatch_raises_before_download(fake_create_model: list[tuple[str, dict]]) -> None:
    with pytest.raises(ModelLoadError, match="trained with QuickGELU but the model config uses GELU"):
        load_model("ViT-B-32@openai")
    assert fake_create_model == []


# --- export -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [TEACHER, "cc-test-rn-teacher"])
def test_export_loads_in_open_clip(tmp_path: Path, inputs, name: str) -> None:
    torch.manual_seed(5)
    model = load_model(name)
    if name == "cc-test-rn-teacher":
        inputs = (torch.randn(2, 3, 64, 64), inputs[1])
    folder = save_open_clip(model, tmp_path / "export")
    assert sorted(p.name for p in folder.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    reloaded = open_clip.create_model("local-dir:" + str(folder)).eval()
    assert_same_outputs(reloaded, model, inputs)
    ours = load_model(str(folder))
    assert ours.clip_cfg == model.clip_cfg
    assert_same_outputs(ours, model, inputs)
    assert_same_outputs(load_model("local-dir:" + str(folder)), model, inputs)
    assert ours.visual.preprocess_cfg["size"] == model.visual.preprocess_cfg["size"]
    assert reloaded.visual.preprocess_cfg["size"] == model.visual.preprocess_cfg["size"]


def test_export_records_quick_gelu(tmp_path: Path, inputs) -> None:
    model = load_model(TEACHER, force_quick_gelu=True)
    folder = save_open_clip(model, tmp_path / "quick")
    config = json.loads((folder / "open_clip_config.json").read_text())
    assert config["model_cfg"]["quick_gelu"] is True
    reloaded = open_clip.create_model("local-dir:" + str(folder)).eval()
    assert any(isinstance(m, QuickGELU) for m in reloaded.modules())
    assert_same_outputs(reloaded, model, inputs)
    assert load_model(str(folder)).clip_cfg["quick_gelu"] is True


def test_export_refuses_non_uniform_model(tmp_path: Path) -> None:
    model = load_model(TEACHER)
    model.transformer.resblocks[1].attn = HeadAttention(64, 3, 16)  # 3 heads where the config says 4
    with pytest.raises(ModelLoadError, match="not uniformly shaped"):
        save_open_clip(model, tmp_path / "x")
    model = load_model(TEACHER)
    attach_masks(model)
    with pytest.raises(ModelLoadError, match="learnable masks"):
        save_open_clip(model, tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_exported_folder_refuses_pretrained_and_forced_activation(tmp_path: Path, teacher: nn.Module) -> None:
    folder = save_open_clip(teacher, tmp_path / "gelu")
    with pytest.raises(ModelLoadError, match="drop pretrained"):
        load_model(str(folder), pretrained="x.pt")
    with pytest.raises(ModelLoadError, match="QuickGELU"):
        load_model(str(folder), force_quick_gelu=True)


@pytest.mark.parametrize(("width", "mlp_width"), [(704, 1480), (448, 488), (768, 3072), (64, 100)])
def test_mlp_ratio_gives_open_clip_the_mlp_width_where_the_quotient_rounds_down(width: int, mlp_width: int) -> None:
    """open_clip builds ``int(width * mlp_ratio)`` neurons; 704 x (1480 / 704) is 1479.99..., so the quotient
    alone would build 1479 (the first ViT-B/32 width step of importance inheritance with channels: prune)."""
    from open_clip.transformer import Transformer

    from compress.models.structure import mlp_ratio

    ratio = mlp_ratio(width, mlp_width)
    assert ratio is not None and int(width * ratio) == mlp_width
    block = Transformer(width=width, layers=1, heads=width // 64 or 1, mlp_ratio=ratio).resblocks[0]
    assert block.mlp.c_fc.out_features == mlp_width
