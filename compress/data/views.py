"""Fixed augmentation views: each training sample has ``A`` crop boxes, drawn once from a key, and an epoch
trains on one of them (the views a teacher-output cache stores its teacher's outputs for).

View ``v`` of sample ``i`` is the crop :meth:`CropViews.draw <compress.data.transforms.CropViews.draw>` makes under
torch's CPU generator seeded with :func:`view_seed` ``(cache_seed, i, v)``; epoch ``e`` of a run seeded ``s`` trains
on view :func:`view_of` ``(s, e, i, A) = (e + offset(s, i)) mod A``: every view once in ``A`` epochs, in an order
that differs between samples and between run seeds (MobileCLIP's reinforced data draws one stored augmentation
per sample and epoch).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from compress.data.robust import torch_seeded
from compress.data.sampling import SeededSamples
from compress.data.shards import Keyed
from compress.data.transforms import Box, CropViews

log = logging.getLogger(__name__)

_MASK = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit hash of an integer (the same in every process)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def view_seed(cache_seed: int, index: int, view: int) -> int:
    """The seed of view ``view`` of sample ``index`` (a 64-bit integer)."""
    return _mix(_mix(_mix(int(cache_seed)) ^ int(index)) ^ int(view))


def view_of(run_seed: int, epoch: int, index: int, num_views: int) -> int:
    """The view sample ``index`` is trained on in ``epoch``: ``(epoch + offset(run_seed, index)) % num_views``."""
    return (int(epoch) + _mix(_mix(int(run_seed) ^ 0x5EED) ^ int(index))) % int(num_views)


def fixed_view_box(crop: CropViews, image: Any, cache_seed: int, index: int, view: int) -> Box:
    """The crop box of view ``view`` of sample ``index``: drawn under :func:`view_seed` (what a cache stores)."""
    with torch_seeded(view_seed(cache_seed, index, view)):
        return crop.draw(image)


@dataclass
class FixedViews:
    """A run's fixed augmentation views (a training ``transform`` :func:`compress.data.build_train_loader` knows):
    ``crop`` makes every model's view of a box, ``num_views`` boxes per sample, drawn from ``cache_seed``, or read
    from ``store`` (a teacher-output cache, :class:`compress.teacher_cache.store.CacheStore`), which also gives
    each sample's teacher outputs for its view (``outputs``: ``(output name, teacher index)`` pairs), put in
    the batch as ``teacher/<output>/<k>`` (read in the loader's workers, moved with the batch)."""

    crop: CropViews
    num_views: int
    cache_seed: int
    store: Any = None
    outputs: tuple[tuple[str, int], ...] = ()


#: the prefix of the batch entries that hold a cached teacher's outputs
CACHED_PREFIX = "teacher/"


def cached_key(output: str, teacher: int) -> str:
    return f"{CACHED_PREFIX}{output}/{teacher}"


class FixedViewSamples(SeededSamples):
    """Sample ``(epoch, index)`` as view :func:`view_of` of its fixed views (:class:`FixedViews`), keyed like
    :class:`~compress.data.sampling.SeededSamples`: ``(views, caption)`` where ``views`` holds each model's image,
    ``"sample_ids"`` and ``"aug_ids"`` (0-d tensors, stacked by the collate) and, with a cache, the teacher's
    outputs for that view. A sample the cache marks bad (its teacher never saw it) is a bad sample here too."""

    def __init__(self, dataset: Dataset, views: FixedViews, seed: int) -> None:
        super().__init__(dataset, seed)
        self.views = views

    def __getitem__(self, key: tuple[int, int]) -> Keyed:
        epoch, index = key
        fixed, store = self.views, self.views.store
        view = view_of(self.seed, epoch, index, fixed.num_views)
        if store is not None and not bool(store.ok([index])[0]):
            return Keyed(key, None)
        item = self.dataset[index]
        if item is None:
            return Keyed(key, None)
        image, caption = item
        try:
            if store is not None:
                box = tuple(int(x) for x in store.boxes([index], [view])[0].tolist())
            else:
                box = fixed_view_box(fixed.crop, image, fixed.cache_seed, index, view)
            out = fixed.crop.apply(image, box)  # type: ignore[arg-type]
        except Exception as error:  # noqa: BLE001 - a sample that fails to decode is a bad sample
            log.warning("sample %d: its view could not be made (%s: %s); skipped", index, type(error).__name__, error)
            return Keyed(key, None)
        out["sample_ids"] = torch.tensor(index, dtype=torch.int64)
        out["aug_ids"] = torch.tensor(view, dtype=torch.int64)
        for name, teacher in fixed.outputs:
            out[cached_key(name, teacher)] = store.outputs(name, teacher, [index], [view])[0]
        return Keyed(key, (out, caption))
