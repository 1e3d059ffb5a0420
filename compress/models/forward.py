"""One forward pass of a CLIP model into a :class:`~compress.outputs.ClipOutput`."""

from __future__ import annotations

from collections.abc import Iterable

import torch.nn.functional as F
from torch import Tensor, nn

from compress.outputs import ClipOutput


def clip_forward(model: nn.Module, images: Tensor, texts: Tensor, needs: Iterable[str] = ()) -> ClipOutput:
    """Encode both modalities; features are L2-normalised, the scale exponentiated.

    ``needs`` may ask for ``image_embeds`` / ``text_embeds`` (the unnormalised embeddings)."""
    image_embeds = model.encode_image(images, normalize=False)
    text_embeds = model.encode_text(texts, normalize=False)
    needs = set(needs)
    return ClipOutput(
        image_features=F.normalize(image_embeds, dim=-1),
        text_features=F.normalize(text_embeds, dim=-1),
        logit_scale=model.logit_scale.exp(),
        image_embeds=image_embeds if "image_embeds" in needs else None,
        text_embeds=text_embeds if "text_embeds" in needs else None,
    )


def embed_dim(model: nn.Module) -> int:
    cfg = getattr(model, "clip_cfg", None)
    if cfg and "embed_dim" in cfg:
        return int(cfg["embed_dim"])
    proj = getattr(model, "text_projection", None)
    return int(proj.shape[-1]) if proj is not None else int(model.visual.output_dim)


def context_length(model: nn.Module) -> int:
    cfg = getattr(model, "clip_cfg", None)
    if cfg:
        return int(cfg["text_cfg"].get("context_length", 77))
    return int(model.context_length)


def image_size(model: nn.Module) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, tuple | list) else size)


def tokenizer_for(model: nn.Module):
    """open_clip's tokenizer for the model: the HF tokenizer its text config names, else the CLIP
    BPE tokenizer at the model's context length."""
    import open_clip

    text = (getattr(model, "clip_cfg", None) or {}).get("text_cfg", {})
    kwargs = {"context_length": context_length(model), **text.get("tokenizer_kwargs", {})}
    if text.get("hf_tokenizer_name"):
        return open_clip.tokenizer.HFTokenizer(text["hf_tokenizer_name"], **kwargs)
    return open_clip.tokenizer.SimpleTokenizer(**kwargs)
