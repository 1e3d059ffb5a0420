"""Parameter counts as TinyCLIP reports them.

TinyCLIP names models by the whole image tower and the text tower without its token
embedding (ViT-B/32: 87.85M + 38.1M). ``logit_scale`` (and ``logit_bias``) belong to neither.
"""

from __future__ import annotations

from torch import nn

TOKEN_EMBEDDING_KEYS = ("token_embedding.weight", "text.token_embedding.weight")
SCALAR_KEYS = ("logit_scale", "logit_bias")


def parameter_report(model: nn.Module) -> dict[str, int]:
    """``{vision, text, token_embedding, total}`` parameter counts of a CLIP model.

    ``text`` excludes the token embedding; ``total`` counts every parameter once."""
    vision = text = token = other = 0
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        if name.startswith("visual."):
            vision += n
        elif name in TOKEN_EMBEDDING_KEYS:
            token += n
        elif name in SCALAR_KEYS:
            other += n
        else:
            text += n
    return {"vision": vision, "text": text, "token_embedding": token, "total": vision + text + token + other}


def prunable_count(model: nn.Module, towers: tuple[str, ...] = ("vision", "text")) -> int:
    """Prunable parameters of ``towers`` (``vision``, ``text``): TinyCLIP's count, the text tower
    without its token embedding (the sum of :func:`parameter_report`'s entries)."""
    report = parameter_report(model)
    return sum(report[name] for name in towers)


def format_millions(count: int) -> str:
    return f"{count / 1e6:.2f}M"
