"""The two towers of a CLIP model as modules of one input each, the unit an ONNX file holds.

``ImageEncoder``: ``pixel_values`` [B, 3, H, W] float32 (already preprocessed: resized, centre-cropped,
normalised with the model's mean/std) -> ``image_embeds`` [B, E]. ``TextEncoder``: ``input_ids`` [B, L]
int64 (the model's tokenizer; open_clip pools the text at the end-of-text token, found as the argmax of the
ids, or as its ``text_pool_type`` says) -> ``text_embeds`` [B, E]. With ``normalize`` (the default) the
embeddings are L2-normalised, so ``logit_scale * image_embeds @ text_embeds.T`` are CLIP's logits
(Radford et al., 2021).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from compress.models.forward import context_length_of, image_size_of

#: the towers an ONNX export may hold, in the order they are written
TOWERS = ("image", "text")
#: input and output names per tower (Hugging Face's CLIP names, so that deployment code reads them as it knows)
INPUT_NAMES = {"image": "pixel_values", "text": "input_ids"}
OUTPUT_NAMES = {"image": "image_embeds", "text": "text_embeds"}


class ImageEncoder(nn.Module):
    """``model.encode_image(pixel_values, normalize=normalize)``."""

    def __init__(self, model: nn.Module, normalize: bool = True) -> None:
        super().__init__()
        self.model, self.normalize = model, normalize

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.model.encode_image(pixel_values, normalize=self.normalize)


class TextEncoder(nn.Module):
    """``model.encode_text(input_ids, normalize=normalize)``."""

    def __init__(self, model: nn.Module, normalize: bool = True) -> None:
        super().__init__()
        self.model, self.normalize = model, normalize

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model.encode_text(input_ids, normalize=self.normalize)


@contextlib.contextmanager
def inference_form(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in float32 and eval mode, the caller's model left as it was: a float32 copy where a parameter or
    buffer has another floating dtype (the model's own weights are not cast), else the model itself in eval
    mode, each submodule's training flag restored on exit."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in tensors):
        yield copy.deepcopy(model).float().eval()
        return
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield model.eval()
    finally:
        for module, training in modes:
            module.training = training


def tower_module(model: nn.Module, tower: str, normalize: bool = True) -> nn.Module:
    """The :class:`ImageEncoder` or :class:`TextEncoder` of ``model`` (in eval mode: call it on the
    :func:`inference_form` of a model whose mode must stay)."""
    if tower not in TOWERS:
        raise ValueError(f"unknown tower {tower!r}; known: {', '.join(TOWERS)}")
    module = ImageEncoder(model, normalize) if tower == "image" else TextEncoder(model, normalize)
    return module.eval()


def example_input(model: nn.Module, tower: str, batch: int) -> Tensor:
    """A traceable input of ``batch`` rows: random pixels, or token ids with the end-of-text token (the largest
    id) at a different position per row, so that the traced graph pools where the ids say, not at a constant."""
    if tower == "image":
        size = image_size_of(model)
        return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    length = context_length_of(model)
    vocab = int(model.clip_cfg.get("text_cfg", {}).get("vocab_size", 49408))
    ids = torch.randint(1, vocab - 1, (batch, length), generator=torch.Generator().manual_seed(0))
    for row in range(batch):
        end = 1 + row % (length - 1)
        ids[row, end] = vocab - 1
        ids[row, end + 1:] = 0
    return ids
