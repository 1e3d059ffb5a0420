"""Manual (TinyCLIP) and no inheritance: layer maps, leading slices, exactness, refusals."""

from __future__ import annotations

import copy
import logging
import re

import pytest
import torch
from torch import nn

from compress.models import HeadAttention, build_from_config, get_model_config, load_model
from compress.models.inherit import InheritanceError, layer_indices
from compress.registry import INHERITANCE, RegistryError

# the expected mapping, written independently of compress.models.inherit
_LAYER = re.compile(r"(visual\.transformer\.resblocks|visual\.layer[1-4]|transformer\.resblocks)\.(\d+)\.")
_GROUP = {"visual.transformer.resblocks": "vision", "transformer.resblocks": "text"}


def teacher_key(key: str, layer_map: dict[str, list[int]]) -> str:
    m = _LAYER.match(key)
    if m is None:
        return key
    group = _GROUP.get(m[1], "vision." + m[1].removeprefix("visual."))
    return f"{m[1]}.{layer_map[group][int(m[2])]}.{key[m.end() :]}"


def assert_inherited(student: nn.Module, teacher: nn.Module, layer_map: dict[str, list[int]]) -> int:
    """Every student tensor equals the leading slice of its teacher tensor; q, k, v head-wise."""
    t_sd = teacher.state_dict()
    attn = {n: m for n, m in student.named_modules() if isinstance(m, HeadAttention)}
    checked = 0
    for key, s in student.state_dict().items():
        if key == "logit_scale":
            continue
        t = t_sd[teacher_key(key, layer_map)]
        if key.endswith(("attn.in_proj_weight", "attn.in_proj_bias")):
            m = attn[key.rsplit(".", 1)[0]]
            rows = m.num_heads * m.head_dim
            for s_part, t_part in zip(s.chunk(3), t.chunk(3), strict=True):  # q, k, v
                expected = t_part[:rows] if s.ndim == 1 else t_part[:rows, : s.shape[1]]
                assert torch.equal(s_part, expected), key
        else:
            assert torch.equal(s, t[tuple(slice(0, n) for n in s.shape)]), key
        checked += 1
    assert checked == len(student.state_dict()) - 1
    return checked


def manual(**params: object):
    return INHERITANCE.build({"name": "manual", **params})


@pytest.fixture(scope="module")
def vit_b32() -> nn.Module:
    torch.manual_seed(0)
    return load_model("ViT-B-32")


@pytest.fixture(scope="module")
def rn50() -> nn.Module:
    torch.manual_seed(0)
    model = load_model("RN50")
    with torch.no_grad():  # open_clip initialises BN to 0/1 (bn3.weight to 0): make every tensor distinct
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.normal_()
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
    return model


@pytest.fixture(scope="module")
def tiny_teacher() -> nn.Module:
    torch.manual_seed(1)
    return load_model("cc-test-teacher")


def tiny_batch(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    images = torch.randn(2, 3, size, size, generator=g)
    tokens = torch.randint(1, 1000, (2, model.context_length), generator=g)
    tokens[:, -1] = 49407  # end-of-text token (argmax pooling)
    return images, tokens


def assert_same_outputs(a: nn.Module, b: nn.Module) -> None:
    images, tokens = tiny_batch(a)
    with torch.no_grad():
        assert (a.encode_image(images) - b.encode_image(images)).abs().max() < 1e-6
        assert (a.encode_text(tokens) - b.encode_text(tokens)).abs().max() < 1e-6


# -- layer rules --------------------------------------------------------------------------
def test_layer_indices() -> None:
    assert layer_indices(12, 6, "interval") == [0, 2, 4, 6, 8, 10]
    assert layer_indices(12, 9, "interval") == list(range(9))
    assert layer_indices(12, 6, "uniform") == [0, 2, 4, 7, 9, 11]
    assert layer_indices(12, 9, "uniform") == [0, 1, 3, 4, 6, 7, 8, 10, 11]
    assert layer_indices(12, 1, "uniform") == [0]
    assert layer_indices(12, 6, "first") == list(range(6))
    assert layer_indices(4, 4, "interval") == [0, 1, 2, 3]
    with pytest.raises(InheritanceError, match="6 layers"):
        layer_indices(4, 6)
    with pytest.raises(ValueError, match="interval, uniform, first"):
        layer_indices(12, 6, "even")


# -- zoo models ---------------------------------------------------------------------------
def test_vit_b32_into_61m(vit_b32: nn.Module) -> None:
    student = load_model("TinyCLIP-ViT-61M-32-Text-29M")
    with torch.no_grad():
        student.logit_scale.fill_(0.5)
    strategy = manual()
    assert strategy.inherit(student, vit_b32) is student
    assert strategy.layer_map == {"vision": list(range(12)), "text": list(range(9))}
    assert assert_inherited(student, vit_b32, strategy.layer_map) > 100
    assert student.logit_scale.item() == 0.5 != vit_b32.logit_scale.item()
    # q, k, v explicitly: 10 of the teacher's 12 heads of 64 dims, first 640 input dims
    s, t = student.visual.transformer.resblocks[5].attn, vit_b32.visual.transformer.resblocks[5].attn
    assert s.num_heads == 10 and s.head_dim == t.head_dim == 64
    for j in range(3):
        assert torch.equal(s.in_proj_weight[j * 640 : (j + 1) * 640], t.in_proj_weight[j * 768 : j * 768 + 640, :640])
    assert torch.equal(s.out_proj.weight, t.out_proj.weight[:640, :640])
    assert torch.equal(student.visual.proj, vit_b32.visual.proj[:640])
    assert torch.equal(student.text_projection, vit_b32.text_projection)


@pytest.mark.slow
def test_vit_b32_into_40m_layer_choices(vit_b32: nn.Module) -> None:
    student = load_model("TinyCLIP-ViT-40M-32-Text-19M")
    strategy = manual()
    strategy.inherit(student, vit_b32)
    assert strategy.layer_map == {"vision": list(range(12)), "text": [0, 2, 4, 6, 8, 10]}
    assert_inherited(student, vit_b32, strategy.layer_map)

    strategy = manual(layer_choice="uniform")
    strategy.inherit(student, vit_b32)
    assert strategy.layer_map["text"] == [0, 2, 4, 7, 9, 11]
    assert_inherited(student, vit_b32, strategy.layer_map)
    assert torch.equal(
        student.transformer.resblocks[3].mlp.c_fc.weight, vit_b32.transformer.resblocks[7].mlp.c_fc.weight
    )

    strategy = manual(layer_choice="uniform", text_layer_choice="first")
    strategy.inherit(student, vit_b32)
    assert strategy.layer_map["text"] == list(range(6))
    assert_inherited(student, vit_b32, strategy.layer_map)


def test_rn50_into_resnet_30m(rn50: nn.Module) -> None:
    student = load_model("TinyCLIP-ResNet-30M-Text-29M")
    strategy = manual()
    strategy.inherit(student, rn50)
    assert strategy.layer_map["text"] == list(range(9))
    assert strategy.layer_map["vision.layer3"] == list(range(6))
    assert_inherited(student, rn50, strategy.layer_map)
    bn, src = student.visual.layer2[1].bn2, rn50.visual.layer2[1].bn2
    assert bn.num_features == 112
    assert torch.equal(bn.running_mean, src.running_mean[:112])
    assert torch.equal(bn.running_var, src.running_var[:112])
    assert bn.num_batches_tracked.item() == 7
    down, src_down = getattr(student.visual.layer1[0].downsample, "0"), getattr(rn50.visual.layer1[0].downsample, "0")
    assert torch.equal(down.weight, src_down.weight[:224, :56])
    assert student.visual.attnpool.num_heads == 28
    assert torch.equal(student.visual.attnpool.q_proj.weight, rn50.visual.attnpool.q_proj.weight[:1792, :1792])


# -- exactness ----------------------------------------------------------------------------
def test_identity_inheritance_reproduces_outputs(tiny_teacher: nn.Module) -> None:
    torch.manual_seed(2)
    student = load_model("cc-test-teacher")
    strategy = manual()
    strategy.inherit(student, tiny_teacher)
    assert strategy.layer_map == {"vision": [0, 1, 2, 3], "text": [0, 1, 2, 3]}
    assert_same_outputs(student, tiny_teacher)


def test_identity_from_unconverted_source(tiny_teacher: nn.Module) -> None:
    source = load_model("cc-test-teacher", convert=False)
    source.load_state_dict(tiny_teacher.state_dict())
    assert any(isinstance(m, nn.MultiheadAttention) for m in source.modules())
    student = manual().inherit(load_model("cc-test-teacher"), source)
    assert_same_outputs(student, tiny_teacher)


def test_identity_resnet() -> None:
    torch.manual_seed(3)
    teacher = load_model("cc-test-rn-teacher")
    with torch.no_grad():
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    student = manual().inherit(load_model("cc-test-rn-teacher"), teacher)
    assert_same_outputs(student, teacher)


def test_tiny_student(tiny_teacher: nn.Module, caplog: pytest.LogCaptureFixture) -> None:
    student = load_model("cc-test-student")
    strategy = manual()
    with caplog.at_level(logging.INFO, logger="strategies.inheritance.manual"):
        strategy.inherit(student, tiny_teacher)
    assert strategy.layer_map == {"vision": [0, 1, 2, 3], "text": [0, 2]}
    assert "text layers <- source layers [0, 2]" in caplog.text
    assert_inherited(student, tiny_teacher, strategy.layer_map)
    images, tokens = tiny_batch(student)
    with torch.no_grad():
        assert torch.isfinite(student.encode_image(images)).all()
        assert student.encode_text(tokens).shape == (2, 32)


# -- refusals -----------------------------------------------------------------------------
def test_refuses_larger_student(tiny_teacher: nn.Module) -> None:
    small = load_model("cc-test-student")
    with pytest.raises(InheritanceError) as info:
        manual().inherit(load_model("cc-test-teacher"), small)
    message = str(info.value)
    assert "text layers (text_cfg.layers): student 4 > source 2" in message
    assert "vision width (vision_cfg.width): student 64 > source 48" in message
    assert "vision heads" in message


def _student_variant(vision: dict[str, object] | None = None, text: dict[str, object] | None = None) -> nn.Module:
    cfg = copy.deepcopy(get_model_config("cc-test-student"))
    cfg["vision_cfg"].update(vision or {})
    cfg["text_cfg"].update(text or {})
    return build_from_config(cfg)


@pytest.mark.parametrize(
    ("vision", "text", "expected"),
    [
        ({"head_width": 8}, None, "head dim: student 8 != source 16"),
        ({"patch_size": 16}, None, "vision token grid"),
        ({"image_size": 48}, None, "vision token grid"),
        (None, {"context_length": 32}, "context length (text_cfg.context_length): student 32 > source 16"),
        (None, {"vocab_size": 50000}, "vocab size (text_cfg.vocab_size): student 50000 > source 49408"),
        (None, {"heads": 8, "width": 128}, "text width (text_cfg.width): student 128 > source 64"),
    ],
)
def test_refuses_mismatched_dimensions(
    tiny_teacher: nn.Module, vision: dict[str, object] | None, text: dict[str, object] | None, expected: str
) -> None:
    with pytest.raises(InheritanceError) as info:
        manual().inherit(_student_variant(vision, text), tiny_teacher)
    assert expected in str(info.value)


def test_refuses_other_architectures(tiny_teacher: nn.Module) -> None:
    with pytest.raises(InheritanceError, match="ModifiedResNet but the source's a VisionTransformer"):
        manual().inherit(load_model("cc-test-rn-student"), tiny_teacher)
    student = load_model("cc-test-student")
    student.extra_head = nn.Linear(4, 4)  # an unknown tensor must not keep its random weights silently
    with pytest.raises(InheritanceError, match="no manual-inheritance rule for student tensor 'extra_head.weight'"):
        manual().inherit(student, tiny_teacher)
    with pytest.raises(InheritanceError, match="needs a student"):
        manual().inherit(None, tiny_teacher)


# -- none ---------------------------------------------------------------------------------
def test_none_keeps_random_weights(tiny_teacher: nn.Module) -> None:
    student = load_model("cc-test-teacher")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    assert INHERITANCE.build("none").inherit(student, tiny_teacher) is student
    after, source = student.state_dict(), tiny_teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(after["visual.conv1.weight"], source["visual.conv1.weight"])
    assert not torch.equal(after["token_embedding.weight"], source["token_embedding.weight"])
    with pytest.raises(InheritanceError, match="CLIP model"):
        INHERITANCE.build("none").inherit(nn.Linear(2, 2), tiny_teacher)


# -- registry -----------------------------------------------------------------------------
def test_registry_entries_and_parameters() -> None:
    entries = {e.name: e.description for e in INHERITANCE.entries()}
    assert "TinyCLIP" in entries["manual"] and "floor" in entries["manual"]
    assert "scratch" in entries["none"]
    options = "layer_choice='even' is not a layer choice; options: interval, uniform, first"
    with pytest.raises(ValueError, match=options):
        manual(layer_choice="even")
    with pytest.raises(ValueError, match="text_layer_choice='last'"):
        manual(text_layer_choice="last")
    with pytest.raises(RegistryError, match="layer_choise"):
        manual(layer_choise="first")
    strategy = manual(layer_choice="first", vision_layer_choice="uniform")
    assert (strategy.vision_layer_choice, strategy.text_layer_choice) == ("uniform", "first")
