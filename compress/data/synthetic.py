"""The embedded synthetic image-text data set "shapes", generated on the fly.

Sample ``i`` of ``(seed, split)`` is always the same image and caption (see
:mod:`compress.data.shapes`). Options (``DatasetConfig.options``) with their defaults:

- ``size: 64`` rendered resolution (the transform then resizes to the model's);
- ``noise: 0.3`` probability of a lightly noisy (instead of plain) background;
- ``two_shape_prob: 0.2`` probability of a two-shape image (train and retrieval views);
- ``holdout: true`` keep the held-out colour-shape pairs out of the training split;
- ``caption_style: random`` (varied templates) or ``full`` (size, colour, shape, position);
- ``cache: false`` keep rendered images in memory (per DataLoader worker);
- ``caption_noise: null`` web-like caption noise: ``web`` or a mapping of probabilities
  (:mod:`compress.data.web_captions`); null keeps every caption exact (and every sample as before).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from compress.config.schema import SYNTHETIC_TASKS
from compress.data.captions import caption
from compress.data.robust import DataError, apply_transform
from compress.data.shapes import (
    COLOR_NAMES,
    HELDOUT,
    NUM_COMBOS,
    SHAPES,
    Scene,
    combo_label,
    pair_scene,
    render,
    sample_rng,
    single_scene,
)
from compress.data.web_captions import CaptionNoise

DEFAULT_NUM_SAMPLES = {"train": 20_000}
DEFAULT_EVAL_SAMPLES = 1_000


@dataclass(frozen=True)
class ShapesOptions:
    size: int = 64
    noise: float = 0.3
    two_shape_prob: float = 0.2
    holdout: bool = True
    caption_style: str = "random"
    cache: bool = False
    caption_noise: CaptionNoise | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.caption_noise, CaptionNoise | None):  # 'web' or a mapping, as written in a config
            object.__setattr__(self, "caption_noise", CaptionNoise.parse(self.caption_noise))

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> ShapesOptions:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise DataError(f"synthetic data: unknown option(s) {unknown}; known: {sorted(known)}")
        opts = cls(**options)
        if opts.caption_style not in ("random", "full"):
            raise DataError(f"synthetic data: caption_style must be random or full, got {opts.caption_style!r}")
        if opts.size < 16:
            raise DataError(f"synthetic data: size must be at least 16, got {opts.size}")
        return opts


def _all_combos(holdout: bool) -> list[tuple[int, int]]:
    combos = [(c, s) for c in range(len(COLOR_NAMES)) for s in range(len(SHAPES))]
    return [x for x in combos if x not in HELDOUT] if holdout else combos


class ShapesDataset(Dataset):
    """(image, caption) pairs of one split; ``transform`` maps the PIL image (None keeps it)."""

    def __init__(
        self,
        seed: int = 0,
        split: str = "train",
        num_samples: int | None = None,
        transform: Any = None,
        options: ShapesOptions | None = None,
    ) -> None:
        self.seed, self.split, self.transform = seed, split, transform
        self.options = options or ShapesOptions()
        self.num_samples = num_samples or DEFAULT_NUM_SAMPLES.get(split, DEFAULT_EVAL_SAMPLES)
        self.combos = _all_combos(self.options.holdout and split == "train")
        self.allowed = frozenset(self.combos)  # the pairs a wrong caption attribute may name
        self._cache: dict[int, tuple[Image.Image, str]] = {}

    def __len__(self) -> int:
        return self.num_samples

    def scene(self, index: int) -> tuple[Scene, str]:
        """The scene and caption of sample ``index`` without rendering it."""
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        o = self.options
        rng = sample_rng(self.seed, self.split, index)
        if rng.random() < o.two_shape_prob:
            a = rng.choice(self.combos)
            b = rng.choice([x for x in self.combos if x != a])
            scene = pair_scene(rng, a, b, o.size, o.noise)
        else:
            c, s = rng.choice(self.combos)
            scene = single_scene(rng, c, s, o.size, o.noise)
        noise = o.caption_noise
        if noise is None:
            return scene, caption(scene, o.size, rng, o.caption_style)
        noise_rng = sample_rng(self.seed, f"{self.split}/caption_noise", index)  # not the scene's stream
        text = caption(scene, o.size, rng, o.caption_style, noise.names(scene, noise_rng, self.allowed))
        return scene, noise.extra(text, noise_rng)

    def pil(self, index: int) -> tuple[Image.Image, str]:
        """Rendered image and caption of sample ``index``."""
        if index in self._cache:
            return self._cache[index]
        scene, text = self.scene(index)
        item = (render(scene, self.options.size), text)
        if self.options.cache:
            self._cache[index] = item
        return item

    def __getitem__(self, index: int) -> tuple[Any, str] | None:
        img, text = self.pil(index)
        out = apply_transform(self.transform, img, f"shapes/{self.split}/{index}")
        return None if out is None else (out, text)


class ShapesClassification(Dataset):
    """Single-shape images labelled for a task: ``shape``, ``color`` or ``color_shape``.

    Sample ``i`` shows colour-shape pair ``i mod 40``, so every pair (held-out ones
    included) is equally represented.
    """

    TASKS = SYNTHETIC_TASKS

    def __init__(
        self,
        task: str = "color_shape",
        seed: int = 0,
        split: str = "val",
        num_samples: int | None = None,
        transform: Any = None,
        options: ShapesOptions | None = None,
    ) -> None:
        if task not in self.TASKS:
            raise DataError(f"unknown synthetic task {task!r}; known: {', '.join(self.TASKS)}")
        self.task, self.seed, self.split, self.transform = task, seed, split, transform
        self.options = options or ShapesOptions()
        self.num_samples = num_samples or DEFAULT_EVAL_SAMPLES
        self.stream = f"{split}/cls"

    def __len__(self) -> int:
        return self.num_samples

    def combo(self, index: int) -> tuple[int, int]:
        k = index % NUM_COMBOS
        return k // len(SHAPES), k % len(SHAPES)

    def label(self, index: int) -> int:
        c, s = self.combo(index)
        return {"shape": s, "color": c, "color_shape": combo_label(c, s)}[self.task]

    def scene(self, index: int) -> Scene:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        c, s = self.combo(index)
        return single_scene(sample_rng(self.seed, self.stream, index), c, s, self.options.size, self.options.noise)

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        img = render(self.scene(index), self.options.size)
        out = apply_transform(self.transform, img, f"shapes/{self.stream}/{index}")
        return None if out is None else (out, self.label(index))
