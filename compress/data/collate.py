"""Collate functions: drop ``None`` (bad) samples, stack images, tokenize captions.

Batches are dicts. Each also carries ``num_bad`` (samples dropped) and ``num_samples``
(samples drawn, bad included; a :class:`~compress.data.robust.Lost` marker stands for samples a
broken shard could not deliver); the main process adds these up in a
:class:`~compress.data.robust.BadSampleCounter` (collate itself runs in the DataLoader
workers, where a counter would be lost). A batch whose samples were all bad has
``images = None``; :class:`~compress.data.loader.CountedLoader` counts it (and refills
training batches to their full size from the next samples).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from compress.data.robust import Lost
from compress.data.shards import Keyed

Batch = dict[str, Any]
Tokenizer = Callable[[list[str]], torch.Tensor]


def make_collate(tokenizer: Tokenizer | None,
                 extra_tokenizers: Mapping[str, Tokenizer] | None = None) -> Callable[[Sequence[Any]], Batch]:
    """Image-text collate: ``{"images": FloatTensor[B,3,H,W], "texts": LongTensor[B,ctx],
    "captions": list[str], "num_bad": int, "num_samples": int}`` (``texts`` is None without
    a tokenizer; ``"teacher_images"`` too when the transform gives the teacher its own view). ``extra_tokenizers``:
    ``{key: tokenizer}``, each one's ids of the captions under its key (a teacher ensemble's member with its own
    tokenizer: :func:`teacher_texts_key`), made in the loader's workers."""
    return _TextCollate(tokenizer, dict(extra_tokenizers or {}))


def teacher_texts_key(index: int) -> str:
    """The batch entry of teacher ``index``'s own token ids (a member whose tokenizer is not the student's)."""
    return f"teacher/texts/{index}"


def make_label_collate() -> Callable[[Sequence[Any]], Batch]:
    """Classification collate: ``{"images", "labels": LongTensor[B], "num_bad", "num_samples"}``."""
    return _label_collate


def make_captions_collate(tokenizer: Tokenizer) -> Callable[[Sequence[Any]], Batch]:
    """Collate of ``(image, [captions...])`` items (retrieval sets with any number of captions per
    image, as clip_benchmark's): ``{"images", "texts": LongTensor[T, ctx] (every caption, image by
    image), "captions", "text_image": LongTensor[T] (each caption's image in the batch), "num_bad",
    "num_samples"}``."""
    return _CaptionsCollate(tokenizer)


class _CaptionsCollate:
    """A picklable closure over the tokenizer."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, items: Sequence[Any]) -> Batch:
        good, batch = tally(items)
        if not good:
            return {**batch, "images": None, "texts": None, "captions": [], "text_image": None}
        captions = [str(c) for _, caps in good for c in caps]
        owner = torch.tensor([i for i, (_, caps) in enumerate(good) for _ in caps], dtype=torch.long)
        return {**batch, **stack_images([img for img, _ in good]), "texts": self.tokenizer(captions),
                "captions": captions, "text_image": owner}


class _TextCollate:
    """A picklable closure over the tokenizer (works with spawned workers too)."""

    def __init__(self, tokenizer: Tokenizer | None, extra: Mapping[str, Tokenizer] | None = None) -> None:
        self.tokenizer = tokenizer
        self.extra = dict(extra or {})

    def __call__(self, items: Sequence[Any]) -> Batch:
        good, batch = tally(items)
        if not good:
            return {**batch, "images": None, "texts": None, "captions": []}
        captions = [str(t) for _, t in good]
        texts = self.tokenizer(captions) if self.tokenizer is not None else None
        extra = {key: tokenizer(captions) for key, tokenizer in self.extra.items()}
        return {**batch, **stack_images([img for img, _ in good]), "texts": texts, "captions": captions, **extra}


def stack_images(images: Sequence[Any]) -> Batch:
    """``{"images": stacked}``; a transform that returns a dict of views per sample (see
    :class:`~compress.data.transforms.DistillTransform`) gives one stacked entry per key."""
    if isinstance(images[0], Mapping):
        return {key: torch.stack([img[key] for img in images]) for key in images[0]}
    return {"images": torch.stack(list(images))}


def tally(items: Sequence[Any]) -> tuple[list[Any], Batch]:
    """The good items, and ``{"num_bad", "num_samples"}``: a ``None`` is one bad sample, a
    :class:`~compress.data.robust.Lost` marker ``count`` bad samples (drawn and bad)."""
    good = [x for x in items if x is not None and not isinstance(x, Lost)]
    lost = [x.count for x in items if isinstance(x, Lost)]
    drawn = len(items) - len(lost) + sum(lost)
    return good, {"num_bad": drawn - len(good), "num_samples": drawn}


def _label_collate(items: Sequence[Any]) -> Batch:
    good, batch = tally(items)
    if not good:
        return {**batch, "images": None, "labels": None}
    labels = torch.tensor([int(y) for _, y in good], dtype=torch.long)
    return {**batch, **stack_images([img for img, _ in good]), "labels": labels}


class KeyedCollate:
    """Training collate over :class:`~compress.data.shards.Keyed` items: the inner collate of the
    items, plus ``"keys"``, the keys of the good samples in the batch's order (what the refill
    reserve saves instead of the decoded images), and ``"fingerprints"``, each image's float64 sum
    (made here, in the worker: what a second reading of the batch is checked against, see
    ``compress.data.pipeline.ReplayStream``; about 40 ms of a worker per 256 images at 224 px)."""

    def __init__(self, collate: Callable[[list[Any]], Batch]) -> None:
        self.collate = collate

    def __call__(self, items: list[Any]) -> Batch:
        keys = [list(x.key) for x in items if isinstance(x, Keyed) and x.item is not None]
        batch = self.collate([x.item if isinstance(x, Keyed) else x for x in items])
        images = batch.get("images")
        prints = images.flatten(1).sum(1, dtype=torch.float64) if isinstance(images, torch.Tensor) else None
        return {**batch, "keys": keys, "fingerprints": prints}
