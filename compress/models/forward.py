"""One forward pass of a CLIP model into a :class:`~compress.outputs.ClipOutput`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from compress.outputs import ClipOutput

#: the optional :class:`ClipOutput` extras a forward pass can fill (what a loss may name in ``needs``)
EXTRAS = ("image_embeds", "text_embeds")


def clip_forward(model: nn.Module, images: Tensor, texts: Tensor, needs: Iterable[str] = ()) -> ClipOutput:
    """Encode both modalities; features are L2-normalised, the scale exponentiated.

    ``needs`` may ask for ``image_embeds`` / ``text_embeds`` (the unnormalised embeddings);
    anything else is refused rather than left ``None``."""
    needs = set(needs)
    unknown = sorted(needs - set(EXTRAS))
    if unknown:
        raise ValueError(f"clip_forward cannot fill {unknown}; it fills {list(EXTRAS)}")
    image_embeds = model.encode_image(images, normalize=False)
    text_embeds = model.encode_text(texts, normalize=False)
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


def context_length_of(model: nn.Module, override: int | None = None) -> int:
    """The text context length: ``override``, else ``clip_cfg["text_cfg"]["context_length"]``
    (open_clip's default 77), else ``model.context_length``."""
    if override is not None:
        return int(override)
    cfg = getattr(model, "clip_cfg", None)
    if cfg:
        return int(cfg["text_cfg"].get("context_length", 77))
    length = getattr(model, "context_length", None)
    if length is None:
        raise ValueError("cannot find the model's text context length (model.context_length); pass it")
    return int(length)


def image_size_of(model: Any, override: int | None = None) -> int:
    """The (square) input resolution: ``override`` (``data.image_size``), ``model.visual.image_size``
    or the model config's ``vision_cfg.image_size`` (``model.clip_cfg``)."""
    if override:
        return int(override)
    visual = getattr(model, "visual", model)
    size = getattr(visual, "image_size", None)
    if size is None:
        size = ((getattr(model, "clip_cfg", None) or {}).get("vision_cfg") or {}).get("image_size")
    if size is None:
        raise ValueError("cannot find the model's image size (model.visual.image_size); set data.image_size")
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise ValueError(f"non-square image size {tuple(size)} is not supported")
        size = size[0]
    return int(size)


def tokenizer_for(model: nn.Module):
    """open_clip's tokenizer for the model: the HF tokenizer its text config names, else the CLIP
    BPE tokenizer at the model's context length."""
    import open_clip

    text = (getattr(model, "clip_cfg", None) or {}).get("text_cfg", {})
    kwargs = {"context_length": context_length_of(model), **text.get("tokenizer_kwargs", {})}
    if text.get("hf_tokenizer_name"):
        return open_clip.tokenizer.HFTokenizer(text["hf_tokenizer_name"], **kwargs)
    return open_clip.tokenizer.SimpleTokenizer(**kwargs)


#: open_clip's defaults of ``text_cfg`` (``CLIPTextCfg``) for what decides the token ids
_TEXT_DEFAULTS = {"context_length": 77, "vocab_size": 49408}


def tokenizer_identity(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What decides a model's token ids, from its open_clip config (as :func:`tokenizer_for` builds
    the tokenizer): the HF tokenizer ``text_cfg.hf_tokenizer_name`` names (else CLIP's BPE), its
    ``tokenizer_kwargs``, the vocabulary size and the context length."""
    text = dict(model_cfg.get("text_cfg") or {})
    return {
        "tokenizer": text.get("hf_tokenizer_name") or "CLIP BPE",
        "tokenizer_kwargs": dict(text.get("tokenizer_kwargs") or {}),
        "vocab_size": int(text.get("vocab_size", _TEXT_DEFAULTS["vocab_size"])),
        "context_length": int(text.get("context_length", _TEXT_DEFAULTS["context_length"])),
    }


def model_tokenizer_identity(model: nn.Module) -> dict[str, Any]:
    """:func:`tokenizer_identity` of a built model (its ``clip_cfg``): two models with equal ones read the same ids."""
    return tokenizer_identity(getattr(model, "clip_cfg", None) or {})


def describe_tokenizer(identity: Mapping[str, Any]) -> str:
    """``CLIP BPE (vocab 49408, context 77)`` and the tokenizer's options, if any."""
    kwargs = "".join(f", {k}={v}" for k, v in sorted(identity["tokenizer_kwargs"].items()))
    return f"{identity['tokenizer']} (vocab {identity['vocab_size']}, context {identity['context_length']}{kwargs})"


def tokenizer_mismatch(teacher_cfg: Mapping[str, Any], student_cfg: Mapping[str, Any]) -> str | None:
    """``None`` when teacher and student read the same token ids, else what differs (one line): the
    data pipeline tokenizes each caption once, with the student's tokenizer, for both models."""
    teacher, student = tokenizer_identity(teacher_cfg), tokenizer_identity(student_cfg)
    if teacher == student:
        return None
    return (f"teacher and student tokenize differently: teacher {describe_tokenizer(teacher)}, student "
            f"{describe_tokenizer(student)}; the captions are tokenized once, with the student's tokenizer, "
            "for both models: distil from a teacher with the student's tokenizer")


def model_list(models: nn.Module | Sequence[nn.Module] | None) -> list[nn.Module]:
    """One model, a sequence of them (a teacher ensemble) or none, as a list."""
    if models is None:
        return []
    return [models] if isinstance(models, nn.Module) else list(models)
