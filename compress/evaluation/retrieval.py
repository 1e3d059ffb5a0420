"""Image-text retrieval recall@k (CLIP, Radford et al. 2021; the COCO / Flickr30k protocol).

Similarities are cosine similarities of L2-normalised features. Image->text R@k is the
share of images for which ANY of their captions is among the k most similar texts;
text->image R@k is the share of texts whose image is among the k most similar images.
Both are percentages. The similarity matrix is computed in row chunks, so memory stays at
``chunk_size x max(N_images, N_texts)`` (COCO 5k x 25k needs no full matrix).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress.evaluation.common import eval_mode, unpack
from compress.precision import Precision, resolve_precision, to_device
from compress.progress import progress_iter

__all__ = ["encode_retrieval_set", "recall_at_k", "retrieval_recall"]


def _encode(encode: Any, x: Tensor, device: torch.device, precision: Precision) -> Tensor:
    with precision.autocast():
        return F.normalize(encode(to_device(x, device)).float(), dim=-1)


@torch.inference_mode()
def encode_retrieval_set(
    model: nn.Module,
    loader: Iterable[Any],
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    progress: bool = False,
    desc: str = "retrieval",
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Normalised fp32 ``(image_features [Ni, E], text_features [Nt, E], text_to_image [Nt])``.

    ``loader`` yields ``(images, tokens)`` (or dicts with ``images`` / ``texts``). Tokens
    [B, L] are one caption per image (pairs); tokens [B, K, L] are K captions per image.
    The implied ``text_to_image`` is ``None`` when a batch has neither form (then the caller
    must give the mapping). ``desc`` names the progress lines (the set: ``retrieval coco``)."""
    device = torch.device(device)
    policy = resolve_precision(precision, device)
    images_out, texts_out, mapping = [], [], []
    implied, offset = True, 0
    with eval_mode(model):
        for batch in progress_iter(loader, desc, progress):
            images, tokens = unpack(batch, ("texts", "tokens"))
            n_img = len(images)
            per_image = tokens.dim() == 3
            if per_image:
                if tokens.shape[0] == n_img:
                    mapping.append(torch.arange(offset, offset + n_img).repeat_interleave(tokens.shape[1]))
                else:
                    implied = False
                tokens = tokens.flatten(0, 1)
            elif len(tokens) == n_img:
                mapping.append(torch.arange(offset, offset + n_img))
            else:
                implied = False
            if n_img:
                images_out.append(_encode(model.encode_image, images, device, policy))
            if len(tokens):
                texts_out.append(_encode(model.encode_text, tokens, device, policy))
            offset += n_img
    if not images_out or not texts_out:
        raise ValueError("the retrieval loader yielded no images or no texts")
    return torch.cat(images_out), torch.cat(texts_out), torch.cat(mapping) if implied else None


def _hits(top: Tensor, target: Tensor, ks: Sequence[int]) -> Tensor:
    """Bool [N, len(ks)]: whether ``target`` (one per row, [N, 1] or [N, kmax]) is in ``top[:, :k]``."""
    match = top == target
    return torch.stack([match[:, :k].any(dim=1) for k in ks], dim=1)


@torch.inference_mode()
def recall_at_k(
    image_features: Tensor,
    text_features: Tensor,
    text_to_image: Tensor | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """``{"i2t_r{k}", "t2i_r{k}"}`` in percent from normalised features; text ``j`` describes
    image ``text_to_image[j]``. Images without any caption are left out of image->text."""
    device = image_features.device
    img, txt = image_features.float(), text_features.to(device).float()
    t2i = torch.as_tensor(text_to_image, dtype=torch.long, device=device)
    ni, nt = img.shape[0], txt.shape[0]
    if t2i.shape != (nt,):
        raise ValueError(f"text_to_image has {t2i.numel()} entries for {nt} texts")
    if nt and (int(t2i.min()) < 0 or int(t2i.max()) >= ni):
        raise ValueError(f"text_to_image must index the {ni} images")
    ks = sorted({int(k) for k in ks})
    i2t_hits, t2i_hits = [], []
    for start in range(0, ni, chunk_size):
        rows = torch.arange(start, min(start + chunk_size, ni), device=device)
        top = (img[rows] @ txt.T).topk(min(ks[-1], nt), dim=1).indices
        i2t_hits.append(_hits(t2i[top], rows.view(-1, 1), ks))
    for start in range(0, nt, chunk_size):
        rows = torch.arange(start, min(start + chunk_size, nt), device=device)
        top = (txt[rows] @ img.T).topk(min(ks[-1], ni), dim=1).indices
        t2i_hits.append(_hits(top, t2i[rows].view(-1, 1), ks))
    has_caption = torch.zeros(ni, dtype=torch.bool, device=device)
    has_caption[t2i] = True
    i2t = torch.cat(i2t_hits)[has_caption].float().mean(dim=0) * 100.0
    t2i_rate = torch.cat(t2i_hits).float().mean(dim=0) * 100.0
    out = {f"i2t_r{k}": i2t[i].item() for i, k in enumerate(ks)}
    out.update({f"t2i_r{k}": t2i_rate[i].item() for i, k in enumerate(ks)})
    return out


def retrieval_recall(
    model: nn.Module,
    loader: Iterable[Any],
    device: str | torch.device = "cpu",
    ks: Sequence[int] = (1, 5, 10),
    text_to_image: Sequence[int] | Tensor | None = None,
    precision: str = "fp32",
    chunk_size: int = 1024,
    progress: bool = False,
    desc: str = "retrieval",
) -> dict[str, float]:
    """Image->text and text->image recall@k (percent) of ``model`` on ``loader``.

    ``text_to_image`` (global, over all texts in loader order) gives the image of each
    text; without it, tokens [B, L] pair text i with image i of the batch and tokens
    [B, K, L] give K captions to each image."""
    img, txt, implied = encode_retrieval_set(model, loader, device, precision, progress, desc)
    mapping = text_to_image if text_to_image is not None else implied
    if mapping is None:
        raise ValueError(
            "batches hold different numbers of images and texts; pass text_to_image "
            "(the index of the image each text describes)"
        )
    return recall_at_k(img, txt, mapping, ks, chunk_size)
