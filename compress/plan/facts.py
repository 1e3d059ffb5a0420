"""What the plan shows of a model without its weights: parameters (TinyCLIP's count) and MACs per image and per
text, from its architecture built on PyTorch's ``meta`` device (no memory, no initialisation); random weights
stand in for pretrained tags and weight files, only a local exported folder is read from disk."""

from __future__ import annotations

import copy
import functools
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.config import ModelSpec
from compress.memory import ModelShape, model_shape, shape_of_model

log = logging.getLogger(__name__)


@dataclass
class ModelFacts:
    """A model as the plan shows it: where its weights come from and its size (``None``: unknown)."""

    label: str
    note: str = ""
    vision: int | None = None
    text: int | None = None
    token_embedding: int | None = None
    total: int | None = None
    macs_image: int | None = None
    macs_text: int | None = None
    #: what the memory estimate reads (:mod:`compress.memory`)
    shape: ModelShape | None = None
    #: the model with its shapes and no weights (PyTorch's ``meta`` device), for the inheritance check
    build: Callable[[], nn.Module] | None = field(default=None, repr=False, compare=False)

    @property
    def prunable(self) -> int | None:
        """Vision tower + text tower without the token embedding (what TinyCLIP counts and prunes)."""
        return None if self.vision is None or self.text is None else self.vision + self.text



def facts_of_model(model: nn.Module) -> dict[str, int]:
    """``parameter_report`` and ``count_macs`` of a built model."""
    from compress.evaluation.efficiency import count_macs
    from compress.models.params import parameter_report

    report = parameter_report(model)
    macs = count_macs(model)
    return {
        "vision": report["vision"],
        "text": report["text"],
        "token_embedding": report["token_embedding"],
        "total": report["total"],
        "macs_image": macs["macs_image"],
        "macs_text": macs["macs_text"],
    }


@functools.lru_cache(maxsize=64)
def _architecture_facts(cfg_json: str) -> tuple[tuple[str, int], ...]:
    """Counts of an open_clip model config, built once per architecture on the ``meta`` device
    (shapes only: a ViT-B/32 takes well under a second); built for real if ``meta`` fails."""
    from compress.models.factory import build_from_config

    cfg = json.loads(cfg_json)
    try:
        facts = facts_of_model(shape_model(cfg))
    except Exception as error:  # an op without a meta kernel in this torch: count on a real build
        log.debug("plan: counting %s on the meta device failed (%s); building it on the CPU", cfg, error)
        facts = facts_of_model(build_from_config(cfg))
    return tuple(facts.items())


def shape_model(model_cfg: Mapping[str, Any]) -> nn.Module:
    """An open_clip model config built on the ``meta`` device: every shape, no weights, no memory."""
    from compress.models.factory import build_from_config

    with torch.device("meta"):
        return build_from_config(model_cfg)


def architecture_facts(model_cfg: Mapping[str, Any]) -> dict[str, int]:
    """Parameters (vision, text, token_embedding, total) and MACs (macs_image, macs_text) of a config."""
    return dict(_architecture_facts(json.dumps(dict(model_cfg), sort_keys=True)))


def model_facts(spec: ModelSpec, role: str, warnings: list[str]) -> ModelFacts:
    """The size of ``spec`` without its weights: a tag or a weight file is replaced by random weights
    of its architecture; a checkpoint gives its architecture from its metadata; an exported folder
    is read. A missing local file is a warning (counts unknown), an unknown tag or an activation
    that does not fit the tag's weights an error (``ModelLoadError``), as the run would fail."""
    from compress.models.factory import (
        _looks_like_path,
        check_pretrained_tag,
        checkpoint_config,
        get_model_config,
        load_model,
        read_config_file,
        resolve_spec,
    )

    kind, name, pretrained = resolve_spec(spec.model, spec.pretrained)
    label = spec.model if spec.pretrained is None else f"{spec.model} (pretrained: {spec.pretrained})"
    path = Path(name)
    if kind == "exported":
        model = load_model(spec.model, force_quick_gelu=spec.force_quick_gelu)
        facts = ModelFacts(label, f"read from {path}", **facts_of_model(model), shape=shape_of_model(model))
        shapes = model.to("meta")  # its weights are not needed any more
        facts.build = lambda: shapes
        return facts
    if kind == "file":
        if not path.is_file():
            warnings.append(f"{role}.model: no such file: {path}")
            return ModelFacts(label, "file missing: size unknown")
        if path.suffix == ".json":
            cfg = read_config_file(path)
        else:
            cfg = checkpoint_config(path)
            if cfg is None:
                warnings.append(f"{role}.model: {path} carries no model config; size unknown")
                return ModelFacts(label, "size unknown")
    else:
        cfg = get_model_config(name)
    cfg = copy.deepcopy(cfg)
    if spec.force_quick_gelu:
        cfg["quick_gelu"] = True
    note = "random weights (an architecture without pretrained weights)" if role.startswith("teacher") else ""
    if kind == "file" and path.suffix != ".json":
        note = f"architecture from {path.name}'s metadata; random weights stand in for its weights"
    if pretrained:
        if kind == "named" and not _looks_like_path(pretrained):
            check_pretrained_tag(name, pretrained, cfg)
        elif not Path(pretrained).is_file():
            warnings.append(f"{role}.pretrained: no such file: {pretrained}")
        note = f"random weights stand in for {pretrained}"
    facts = architecture_facts(cfg)
    return ModelFacts(label, note, **facts, shape=model_shape(cfg, facts["total"]), build=lambda: shape_model(cfg))
