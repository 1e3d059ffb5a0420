"""Checking a teacher cache against its teachers: random (sample, view) pairs recomputed online, on the view built
from the stored box, and the largest absolute difference per output and teacher."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compress.config import RunConfig
from compress.teacher_cache.identity import CacheConfigError, cache_root
from compress.teacher_cache.samples import check_cacheable, draw_boxes, teacher_views, train_samples
from compress.teacher_cache.store import CacheStore
from compress.teacher_cache.teachers import Teachers

#: the largest absolute difference ``verify`` accepts per stored dtype (fp32: float reassociation of other batch
#: compositions; fp16 / bf16: their rounding of values up to ~1 in size)
TOLERANCES = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 2e-2}


@dataclass
class VerifyReport:
    """``max_abs[output][k]``: the largest |cached - online| of teacher k's output over the checked pairs;
    ``box_mismatches``: stored boxes that differ from a fresh draw (should be 0)."""

    root: Path
    dtype: str
    pairs: list[tuple[int, int]]
    max_abs: dict[str, list[float]]
    box_mismatches: int

    @property
    def tolerance(self) -> float:
        return TOLERANCES[self.dtype]

    @property
    def passed(self) -> bool:
        worst = max((v for values in self.max_abs.values() for v in values), default=0.0)
        return self.box_mismatches == 0 and worst <= self.tolerance


def _random_pairs(store: CacheStore, n: int, seed: int) -> list[tuple[int, int]]:
    """``n`` random (good sample, view) pairs of the shards written: ``max(4n, n + 64)`` draws of a random written
    shard, then a random row of it (duplicates dropped, bad samples left out), O(n) in memory and time whatever the
    number of samples; only the drawn samples' ``ok`` is read."""
    present = np.asarray(store.written_shards(), dtype=np.int64)
    if present.size == 0:
        raise CacheConfigError(f"teacher cache {store.root}: no shard written yet: nothing to verify")
    rng = np.random.default_rng(seed)
    size, total, views = store.shard_size, store.num_samples, int(store.manifest["num_augmentations"])
    shards = rng.choice(present, size=max(4 * n, n + 64))
    starts = shards * size
    ids = rng.integers(starts, np.minimum(starts + size, total))
    _, first = np.unique(ids, return_index=True)
    ids = ids[np.sort(first)]  # distinct, in the order drawn
    good = ids[store.ok(ids).numpy()][:n]
    return [(int(i), int(rng.integers(views))) for i in good]


def verify(cfg: RunConfig, n: int, seed: int = 0, batch_size: int = 256) -> VerifyReport:
    """Recompute ``n`` random (sample, view) pairs of the cache online (the teachers on the view built from the
    stored box) and report the largest absolute difference per output and teacher (:class:`VerifyReport`)."""
    check_cacheable(cfg)
    assert cfg.teacher_cache is not None
    tc = cfg.teacher_cache
    store = CacheStore(cache_root(cfg))
    pairs = _random_pairs(store, n, seed)
    dataset = train_samples(cfg)
    teachers = Teachers.load(cfg, tc.outputs)
    crop = teacher_views(teachers.preprocess)
    max_abs = {name: [0.0] * len(teachers.models) for name in tc.outputs}
    mismatches = 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        ids, augs = torch.tensor([i for i, _ in chunk]), torch.tensor([a for _, a in chunk])
        boxes = store.boxes(ids, augs)
        views, captions = [], []
        for (i, a), box in zip(chunk, boxes.tolist(), strict=True):
            img, caption = dataset[i]
            mismatches += draw_boxes(crop, img, tc.seed, i, a + 1)[a] != tuple(box)
            views.append(crop.apply(img, tuple(box)))
            captions.append(str(caption))
        for k in range(len(teachers.models)):
            out = teachers.forward(k, torch.stack([v[str(k)] for v in views]), captions)
            for name in tc.outputs:
                cached = store.outputs(name, k, ids, augs)
                diff = (getattr(out, name).cpu() - cached).abs().max().item() if len(chunk) else 0.0
                max_abs[name][k] = max(max_abs[name][k], float(diff))
    return VerifyReport(store.root, tc.dtype, pairs, max_abs, mismatches)
