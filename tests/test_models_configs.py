"""The shipped TinyCLIP configs have the architecture and parameter counts of the TinyCLIP models
(Wu et al., "TinyCLIP: CLIP Distillation via Affinity Mimicking and Weight Inheritance", ICCV 2023,
and its released model zoo).

Models are built on the meta device (shapes only, no memory, no initialisation cost).
"""

from __future__ import annotations

import pytest
import torch

from compress.models import build_from_config, get_model_config, list_shipped_configs
from compress.models.params import format_millions, parameter_report

# name: (vision params, text params without token embedding), in millions, of the TinyCLIP paper's models
PAPER_COUNTS = {
    "ViT-B-32": (87.85, 38.13),  # the paper rounds the text tower to 38.1M
    "TinyCLIP-ViT-61M-32-Text-29M": (61.41, 28.67),
    "TinyCLIP-ViT-40M-32-Text-19M": (39.69, 19.22),
    "TinyCLIP-ViT-39M-16-Text-19M": (38.59, 19.22),
    "TinyCLIP-ViT-8M-16-Text-3M": (8.28, 2.52),
}

# Counts the ResNet configs give (not listed in the paper). The configs equal the official
# release (microsoft/Cream TinyCLIP/src/open_clip/model_configs): RN50 layers [3, 4, 6, 3],
# width 56 / 44, embed 1024, text 9 / 6 layers of 512. The text towers are 0.26M larger
# than the ViT ones of the same depth: their text projection is 512x1024, not 512x512.
RESNET_COUNTS = {
    "TinyCLIP-ResNet-30M-Text-29M": (29_583_780, 28_936_192),
    "TinyCLIP-ResNet-19M-Text-19M": (18_596_766, 19_479_040),
}

# name: (vision layers, width, heads, patch), (text layers, width, heads): the TinyCLIP paper's models
VIT_ARCH = {
    "ViT-B-32": ((12, 768, 12, 32), (12, 512, 8)),
    "TinyCLIP-ViT-61M-32-Text-29M": ((12, 640, 10, 32), (9, 512, 8)),
    "TinyCLIP-ViT-40M-32-Text-19M": ((12, 512, 8, 32), (6, 512, 8)),
    "TinyCLIP-ViT-39M-16-Text-19M": ((12, 512, 8, 16), (6, 512, 8)),
    "TinyCLIP-ViT-8M-16-Text-3M": ((10, 256, 4, 16), (3, 256, 4)),
}
RESNET_ARCH = {
    "TinyCLIP-ResNet-30M-Text-29M": (56, (9, 512, 8)),
    "TinyCLIP-ResNet-19M-Text-19M": (44, (6, 512, 8)),
}
ZOO = [*PAPER_COUNTS, *RESNET_COUNTS]


def meta_model(name: str) -> torch.nn.Module:
    """An unconverted model of a named config, on the meta device."""
    with torch.device("meta"):
        return build_from_config(get_model_config(name), convert=False)


@pytest.fixture(scope="module")
def reports() -> dict[str, dict[str, int]]:
    return {name: parameter_report(meta_model(name)) for name in ZOO}


def test_all_zoo_configs_are_shipped() -> None:
    shipped = set(list_shipped_configs())
    assert {n for n in ZOO if n.startswith("TinyCLIP")} <= shipped


@pytest.mark.parametrize("name", list(PAPER_COUNTS))
def test_vit_parameter_counts_match_paper(name: str, reports: dict[str, dict[str, int]]) -> None:
    vision, text = PAPER_COUNTS[name]
    report = reports[name]
    assert abs(report["vision"] / 1e6 - vision) < 0.01, format_millions(report["vision"])
    assert abs(report["text"] / 1e6 - text) < 0.01, format_millions(report["text"])


def test_vit_b32_exact_counts(reports: dict[str, dict[str, int]]) -> None:
    assert reports["ViT-B-32"]["vision"] == 87_849_216
    assert reports["ViT-B-32"]["text"] == 38_131_200
    assert reports["ViT-B-32"]["token_embedding"] == 49408 * 512


@pytest.mark.parametrize("name", list(RESNET_COUNTS))
def test_resnet_parameter_counts(name: str, reports: dict[str, dict[str, int]]) -> None:
    vision, text = RESNET_COUNTS[name]
    assert (reports[name]["vision"], reports[name]["text"]) == (vision, text)


def test_resnet_counts_fit_their_names(reports: dict[str, dict[str, int]]) -> None:
    assert format_millions(reports["TinyCLIP-ResNet-30M-Text-29M"]["vision"]) == "29.58M"
    assert format_millions(reports["TinyCLIP-ResNet-30M-Text-29M"]["text"]) == "28.94M"
    assert format_millions(reports["TinyCLIP-ResNet-19M-Text-19M"]["vision"]) == "18.60M"
    assert format_millions(reports["TinyCLIP-ResNet-19M-Text-19M"]["text"]) == "19.48M"


def _text_arch(cfg: dict) -> tuple[int, int, int]:
    text = cfg["text_cfg"]
    return text["layers"], text["width"], text["heads"]


@pytest.mark.parametrize("name", list(VIT_ARCH))
def test_vit_architecture_fields(name: str) -> None:
    cfg = get_model_config(name)
    vision = cfg["vision_cfg"]
    heads = vision["width"] // vision.get("head_width", 64)
    assert (vision["layers"], vision["width"], heads, vision["patch_size"]) == VIT_ARCH[name][0]
    assert _text_arch(cfg) == VIT_ARCH[name][1]
    assert cfg["embed_dim"] == 512
    assert vision["image_size"] == 224
    assert not cfg.get("quick_gelu", False)


@pytest.mark.parametrize("name", list(VIT_ARCH))
def test_vit_built_heads(name: str) -> None:
    model = meta_model(name)
    layers, width, heads, patch = VIT_ARCH[name][0]
    blocks = model.visual.transformer.resblocks
    assert len(blocks) == layers
    assert all(b.attn.num_heads == heads and b.attn.embed_dim == width for b in blocks)
    assert model.visual.conv1.kernel_size == (patch, patch)
    t_layers, t_width, t_heads = VIT_ARCH[name][1]
    assert [b.attn.num_heads for b in model.transformer.resblocks] == [t_heads] * t_layers
    assert model.transformer.width == t_width


@pytest.mark.parametrize("name", list(RESNET_ARCH))
def test_resnet_architecture_fields(name: str) -> None:
    cfg = get_model_config(name)
    width, text = RESNET_ARCH[name]
    assert cfg["vision_cfg"]["layers"] == [3, 4, 6, 3]  # RN50
    assert cfg["vision_cfg"]["width"] == width
    assert cfg["embed_dim"] == 1024
    assert _text_arch(cfg) == text
    assert not cfg.get("quick_gelu", False)


def test_resnet_30m_attention_pool_matches_release() -> None:
    """The released ResNet-30M checkpoint has AttentionPool2d(1792 -> 1024, 28 heads)."""
    pool = meta_model("TinyCLIP-ResNet-30M-Text-29M").visual.attnpool
    assert tuple(pool.c_proj.weight.shape) == (1024, 1792)
    assert pool.num_heads == 28
    pool19 = meta_model("TinyCLIP-ResNet-19M-Text-19M").visual.attnpool
    assert tuple(pool19.c_proj.weight.shape) == (1024, 44 * 32)
    assert pool19.num_heads == 22


def test_report_total_is_sum(reports: dict[str, dict[str, int]]) -> None:
    for report in reports.values():
        assert report["total"] == report["vision"] + report["text"] + report["token_embedding"] + 1
