"""The samples a cache generator feeds its teachers: each training sample decoded once, its ``A`` crop boxes drawn
from ``(seed, sample, view)`` and each box replayed into every teacher's view (size and normalisation).

Box ``v`` of sample ``i`` is :meth:`CropViews.draw <compress.data.transforms.CropViews.draw>` under torch's CPU
generator seeded with :func:`~compress.data.views.view_seed` ``(seed, i, v)``: what training replays from the
stored box. A data set item ``None`` (a bad sample) is an item with ``ok`` False and no views.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from open_clip.transform import PreprocessCfg
from torch.utils.data import Dataset

from compress.config import RunConfig
from compress.data.datasets import build_dataset
from compress.data.robust import warn_bad
from compress.data.transforms import Box, CropViews
from compress.data.views import fixed_view_box
from compress.teacher_cache.identity import CacheConfigError


def draw_boxes(crop: CropViews, img: Any, seed: int, index: int, num_views: int) -> list[Box]:
    """The ``num_views`` crop boxes of sample ``index`` (:func:`compress.data.views.fixed_view_box`)."""
    return [fixed_view_box(crop, img, seed, index, view) for view in range(num_views)]


def teacher_views(preprocess: Sequence[PreprocessCfg]) -> CropViews:
    """One view per teacher, named ``"0"``, ``"1"``, ...: the training crop resized and normalised for it."""
    return CropViews({str(k): cfg for k, cfg in enumerate(preprocess)})


class ViewSamples(Dataset):
    """Sample ``i`` of ``dataset`` (PIL image, caption) as ``{"index", "ok", "boxes": int32[A, 4], "views": {k:
    Tensor[A, 3, H_k, W_k]}, "caption"}``; a bad sample is ``{"index", "ok": False}``."""

    def __init__(self, dataset: Dataset, crop: CropViews, num_views: int, seed: int) -> None:
        self.dataset, self.crop, self.num_views, self.seed = dataset, crop, int(num_views), int(seed)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        if item is None:
            return {"index": index, "ok": False}
        img, caption = item
        try:
            boxes = draw_boxes(self.crop, img, self.seed, index, self.num_views)
            per_view = [self.crop.apply(img, box) for box in boxes]
        except Exception as error:  # noqa: BLE001 - an image the crop cannot read is a bad sample
            warn_bad(f"sample {index}", error)
            return {"index": index, "ok": False}
        views = {name: torch.stack([v[name] for v in per_view]) for name in per_view[0]}
        return {"index": index, "ok": True, "boxes": torch.tensor(boxes, dtype=torch.int32), "views": views,
                "caption": str(caption)}


def collate_views(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``{"index": LongTensor[B], "ok": BoolTensor[B], "boxes": int32[G, A, 4], "views": {k: Tensor[G*A, ...]},
    "captions": [G]}``: the G good samples' rows sample-major (sample g's view a is row g*A + a)."""
    good = [x for x in items if x["ok"]]
    out: dict[str, Any] = {"index": torch.tensor([x["index"] for x in items], dtype=torch.long),
                           "ok": torch.tensor([bool(x["ok"]) for x in items], dtype=torch.bool),
                           "captions": [x["caption"] for x in good]}
    if good:
        out["boxes"] = torch.stack([x["boxes"] for x in good])
        out["views"] = {name: torch.cat([x["views"][name] for x in good]) for name in good[0]["views"]}
    return out


def check_cacheable(cfg: RunConfig) -> None:
    """Refuse a config without a ``teacher_cache`` section, or with webdataset training data (one line)."""
    if cfg.teacher_cache is None:
        raise CacheConfigError("the config has no teacher_cache section: add one (teacher_cache: {dir: DIR, "
                               "num_augmentations: A, dtype: fp16}) to cache its teachers' outputs")
    if cfg.data.train.kind == "webdataset":
        raise CacheConfigError("teacher_cache: data.train.kind webdataset is not supported (a cache needs stable "
                               "sample ids: a map-style data set, synthetic, csv or folder)")


def train_samples(cfg: RunConfig) -> Dataset:
    """The training set as (PIL image, caption) items; sample id = index."""
    train = cfg.data.train
    return build_dataset(train, transform=None, split=train.split)
