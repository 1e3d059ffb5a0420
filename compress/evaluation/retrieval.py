"""Image-text retrieval recall@k (CLIP, Radford et al. 2021; the COCO / Flickr30k protocol).

Similarities are cosine similarities of L2-normalised features. Image->text R@k is the
share of images for which a correct text is among the k most similar texts; text->image R@k is
the share of texts for which a correct image is among the k most similar images. Both are
percentages.

Correct means identical text, not the same row: a retrieved text counts for an image when it is
identical (the same token ids, so the same embedding) to one of the image's own captions, and an
image counts for a text when one of its captions is identical to the text (each image has a SET of
correct texts, as COCO's five captions). With a row-identity rule, a caption repeated for several
images makes R@1 depend on how ``topk`` orders exactly tied scores (the synthetic validation set
repeats 171 of its 400 captions); with the set rule it does not. Without the token ids
(:func:`recall_at_k` given no ``text_ids``) every text is distinct, which is clip_benchmark's rule
and equal to it on sets without repeated captions. ``row_rule=True`` also returns clip_benchmark's numbers
(``row/i2t_r{k}``, ``row/t2i_r{k}``: only a text's own image counts, whatever its token ids) from the same
top-k lists, for the files named as clip_benchmark's (:mod:`compress.result_files`).

The similarity matrix is computed in row chunks, so memory stays at
``chunk_size x max(N_images, N_texts)`` (COCO 5k x 25k needs no full matrix).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress.evaluation.common import eval_mode, unpack
from compress.precision import Precision, resolve_precision, to_device
from compress.progress import progress_iter

__all__ = ["RetrievalFeatures", "encode_retrieval_set", "recall_at_k", "retrieval_recall", "text_identities"]


def _encode(encode: Any, x: Tensor, device: torch.device, precision: Precision) -> Tensor:
    with precision.autocast():
        return F.normalize(encode(to_device(x, device)).float(), dim=-1)


class RetrievalFeatures(NamedTuple):
    """What :func:`encode_retrieval_set` returns: normalised fp32 features, the image of each text
    (``None`` when the batches do not imply it) and each text's identity (:func:`text_identities`)."""

    image_features: Tensor
    text_features: Tensor
    text_to_image: Tensor | None
    text_ids: Tensor | None


def text_identities(tokens: Tensor) -> Tensor:
    """An id per text row of ``tokens`` [Nt, L], equal for identical rows (the index of the row among
    the distinct rows): identical token ids are identical texts to the model."""
    return torch.unique(tokens.reshape(tokens.shape[0], -1), dim=0, return_inverse=True)[1]


def _batch_mapping(batch: Any, tokens: Tensor, n_img: int, offset: int) -> Tensor | None:
    """The image index of each text of a batch, or ``None`` if the batch does not say: a dict
    batch's ``text_image`` (index in the batch, several captions per image), tokens [B, K, L], or
    one text per image."""
    if isinstance(batch, dict) and batch.get("text_image") is not None:
        return offset + torch.as_tensor(batch["text_image"], dtype=torch.long).cpu()
    if tokens.dim() == 3:
        return torch.arange(offset, offset + n_img).repeat_interleave(tokens.shape[1]) if len(tokens) == n_img else None
    return torch.arange(offset, offset + n_img) if len(tokens) == n_img else None


@torch.inference_mode()
def encode_retrieval_set(
    model: nn.Module,
    loader: Iterable[Any],
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    progress: bool = False,
    desc: str = "retrieval",
) -> RetrievalFeatures:
    """Normalised fp32 ``(image_features [Ni, E], text_features [Nt, E], text_to_image [Nt], text_ids [Nt])``.

    ``loader`` yields ``(images, tokens)`` (or dicts with ``images`` / ``texts``). Tokens
    [B, L] are one caption per image (pairs); tokens [B, K, L] are K captions per image; a dict
    batch with ``text_image`` (the index in the batch of each text's image) has any number of
    captions per image. The implied ``text_to_image`` is ``None`` when a batch has none of these
    forms (then the caller must give the mapping). ``text_ids`` is ``None`` when the texts are not
    token ids. ``desc`` names the progress lines (the set: ``retrieval coco``)."""
    device = torch.device(device)
    policy = resolve_precision(precision, device)
    images_out, texts_out, mapping, token_rows = [], [], [], []
    implied, offset = True, 0
    with eval_mode(model):
        for batch in progress_iter(loader, desc, progress):
            images, tokens = unpack(batch, ("texts", "tokens"))
            if images is None:  # a batch whose samples were all bad (counted by the loader)
                continue
            n_img = len(images)
            batch_map = _batch_mapping(batch, tokens, n_img, offset)
            if batch_map is None:
                implied = False
            else:
                mapping.append(batch_map)
            tokens = tokens.flatten(0, 1) if tokens.dim() == 3 else tokens
            if n_img:
                images_out.append(_encode(model.encode_image, images, device, policy))
            if len(tokens):
                texts_out.append(_encode(model.encode_text, tokens, device, policy))
                token_rows.append(tokens.cpu() if not tokens.is_floating_point() else None)
            offset += n_img
    if not images_out or not texts_out:
        raise ValueError("the retrieval loader yielded no images or no texts")
    ids = text_identities(torch.cat(token_rows)) if all(t is not None for t in token_rows) else None
    return RetrievalFeatures(torch.cat(images_out), torch.cat(texts_out), torch.cat(mapping) if implied else None, ids)


def _correct_keys(t2i: Tensor, ids: Tensor, n_ids: int) -> Tensor:
    """The sorted codes ``image * n_ids + text id`` of every (image, caption identity) pair."""
    return torch.unique(t2i * n_ids + ids)


def _is_correct(keys: Tensor, correct: Tensor) -> Tensor:
    """Whether each code of ``keys`` is among the sorted ``correct`` codes (same shape as ``keys``)."""
    pos = torch.searchsorted(correct, keys).clamp(max=correct.numel() - 1)
    return correct[pos] == keys


def _rates(correct: Tensor, ks: Sequence[int]) -> Tensor:
    """Bool [N, len(ks)]: whether any of the first ``k`` columns of ``correct`` [N, kmax] is true."""
    return torch.stack([correct[:, :k].any(dim=1) for k in ks], dim=1)


@torch.inference_mode()
def recall_at_k(
    image_features: Tensor,
    text_features: Tensor,
    text_to_image: Tensor | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
    text_ids: Tensor | Sequence[int] | None = None,
    row_rule: bool = False,
) -> dict[str, float]:
    """``{"i2t_r{k}", "t2i_r{k}"}`` in percent from normalised features; text ``j`` describes
    image ``text_to_image[j]``. Images without any caption are left out of image->text.

    ``text_ids`` (one per text, equal for identical texts: :func:`text_identities`): a text is
    correct for an image when its id is that of one of the image's captions, in both directions (the
    module docstring). Without it every text is distinct (row identity). ``row_rule``: also
    ``row/i2t_r{k}`` / ``row/t2i_r{k}``, clip_benchmark's rule (only the text's own image counts), from
    the same top-k lists. No images or no texts: ``ValueError``."""
    device = image_features.device
    img, txt = image_features.float(), text_features.to(device).float()
    t2i = torch.as_tensor(text_to_image, dtype=torch.long, device=device)
    ni, nt = img.shape[0], txt.shape[0]
    if ni == 0 or nt == 0:
        raise ValueError(f"retrieval needs images and texts, got {ni} images and {nt} texts")
    if t2i.shape != (nt,):
        raise ValueError(f"text_to_image has {t2i.numel()} entries for {nt} texts")
    if nt and (int(t2i.min()) < 0 or int(t2i.max()) >= ni):
        raise ValueError(f"text_to_image must index the {ni} images")
    ids = torch.arange(nt, device=device) if text_ids is None else torch.as_tensor(text_ids, device=device).long()
    if ids.shape != (nt,):
        raise ValueError(f"text_ids has {ids.numel()} entries for {nt} texts")
    n_ids = int(ids.max()) + 1 if nt else 1
    correct = _correct_keys(t2i, ids, n_ids)
    ks = sorted({int(k) for k in ks})
    hits: dict[str, list[Tensor]] = {"i2t": [], "t2i": [], "row/i2t": [], "row/t2i": []}
    for start in range(0, ni, chunk_size):
        rows = torch.arange(start, min(start + chunk_size, ni), device=device)
        top = (img[rows] @ txt.T).topk(min(ks[-1], nt), dim=1).indices
        hits["i2t"].append(_rates(_is_correct(rows.view(-1, 1) * n_ids + ids[top], correct), ks))
        if row_rule:
            hits["row/i2t"].append(_rates(t2i[top] == rows.view(-1, 1), ks))
    for start in range(0, nt, chunk_size):
        rows = torch.arange(start, min(start + chunk_size, nt), device=device)
        top = (txt[rows] @ img.T).topk(min(ks[-1], ni), dim=1).indices
        hits["t2i"].append(_rates(_is_correct(top * n_ids + ids[rows].view(-1, 1), correct), ks))
        if row_rule:
            hits["row/t2i"].append(_rates(top == t2i[rows].view(-1, 1), ks))
    has_caption = torch.zeros(ni, dtype=torch.bool, device=device)
    has_caption[t2i] = True
    out = {}
    for name, parts in hits.items():
        if parts:
            rate = torch.cat(parts)
            rate = (rate[has_caption] if name.endswith("i2t") else rate).float().mean(dim=0) * 100.0
            out.update({f"{name}_r{k}": rate[i].item() for i, k in enumerate(ks)})
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
    row_rule: bool = False,
) -> dict[str, float]:
    """Image->text and text->image recall@k (percent) of ``model`` on ``loader`` (``row_rule``: also
    clip_benchmark's numbers, :func:`recall_at_k`).

    ``text_to_image`` (global, over all texts in loader order) gives the image of each
    text; without it, tokens [B, L] pair text i with image i of the batch and tokens
    [B, K, L] give K captions to each image. Identical texts (equal token ids) count as the same
    text (the module docstring)."""
    img, txt, implied, ids = encode_retrieval_set(model, loader, device, precision, progress, desc)
    mapping = text_to_image if text_to_image is not None else implied
    if mapping is None:
        raise ValueError(
            "batches hold different numbers of images and texts; pass text_to_image "
            "(the index of the image each text describes)"
        )
    return recall_at_k(img, txt, mapping, ks, chunk_size, text_ids=ids, row_rule=row_rule)
