"""The "shapes" world: colours, shapes, held-out combinations, scene sampling, rendering.

A scene is one or two coloured shapes on a grey (optionally lightly noisy) background.
Every scene is a pure function of ``(seed, stream, index)``: a per-sample
``random.Random`` is seeded from those three numbers, so sample ``i`` is the same image
and caption in every process and every run.

Held-out combinations (:data:`HELDOUT`): 8 of the 40 colour-shape pairs, one per colour
and covering every shape. They never appear in the training split at all (neither as
the only shape nor as either shape of a two-shape image), so zero-shot accuracy on them
measures compositional generalisation. The validation split contains all 40.
"""

from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

#: clearly separable colours (none close to the grey backgrounds)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (40, 70, 235),
    "yellow": (245, 225, 30),
    "purple": (140, 40, 190),
    "orange": (250, 140, 20),
    "cyan": (30, 215, 225),
    "white": (250, 250, 250),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
NUM_COMBOS = len(COLOR_NAMES) * len(SHAPES)

#: (colour index, shape index) pairs never shown in training: colour i with shape 3i mod 5
HELDOUT: frozenset[tuple[int, int]] = frozenset((c, (3 * c) % len(SHAPES)) for c in range(len(COLOR_NAMES)))

_STREAMS = {"train": 1, "val": 2, "test": 3}


def combo_label(color: int, shape: int) -> int:
    """Class id of a colour-shape pair in the ``color_shape`` task."""
    return color * len(SHAPES) + shape


def combo_name(label: int) -> str:
    return f"{COLOR_NAMES[label // len(SHAPES)]} {SHAPES[label % len(SHAPES)]}"


def heldout_labels() -> list[int]:
    return sorted(combo_label(c, s) for c, s in HELDOUT)


def stream_id(name: str) -> int:
    """A stable integer for a split / stream name (``train``, ``val``, ``val/cls``...)."""
    return _STREAMS.get(name, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def sample_rng(seed: int, stream: str, index: int) -> random.Random:
    """The per-sample generator, a function of (seed, stream, index) only."""
    return random.Random((int(seed) * 1_000_003 + stream_id(stream)) * 0x1_0000_0001 + int(index))


@dataclass(frozen=True)
class Obj:
    """One shape in a scene; ``r`` is the circumradius, ``angle`` a rotation in degrees."""

    color: int
    shape: int
    cx: float
    cy: float
    r: float
    angle: float
    size_word: str
    rgb: tuple[int, int, int]

    @property
    def label(self) -> int:
        return combo_label(self.color, self.shape)

    @property
    def color_name(self) -> str:
        return COLOR_NAMES[self.color]

    @property
    def shape_name(self) -> str:
        return SHAPES[self.shape]


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: tuple[int, int, int]
    noise: int  # index of the noise tile, -1 for a plain background
    relation: str = ""  # for two shapes: how objects[0] relates to objects[1]

    @property
    def combos(self) -> list[tuple[int, int]]:
        return [(o.color, o.shape) for o in self.objects]


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int = 14) -> tuple[int, int, int]:
    return tuple(min(255, max(0, v + rng.randint(-amount, amount))) for v in rgb)  # type: ignore[return-value]


def _background(rng: random.Random, noise_prob: float) -> tuple[tuple[int, int, int], int]:
    level = rng.randint(70, 140)
    bg = tuple(level + rng.randint(-8, 8) for _ in range(3))
    noise = rng.randrange(_NOISE_TILES) if rng.random() < noise_prob else -1
    return bg, noise  # type: ignore[return-value]


def _make_obj(rng: random.Random, color: int, shape: int, r: float, cx: float, cy: float, size_word: str) -> Obj:
    angle = rng.uniform(-8, 8) if SHAPES[shape] != "circle" else 0.0
    return Obj(color, shape, cx, cy, r, angle, size_word, _jitter(COLORS[COLOR_NAMES[color]], rng))


def single_scene(rng: random.Random, color: int, shape: int, size: int, noise_prob: float) -> Scene:
    """One shape, small or large, anywhere it fits."""
    bg, noise = _background(rng, noise_prob)
    large = rng.random() < 0.5
    r = size * (rng.uniform(0.3, 0.38) if large else rng.uniform(0.2, 0.26))
    cx = rng.uniform(r + 1, size - r - 1)
    cy = rng.uniform(r + 1, size - r - 1)
    obj = _make_obj(rng, color, shape, r, cx, cy, "large" if large else "small")
    return Scene((obj,), bg, noise)


def pair_scene(rng: random.Random, a: tuple[int, int], b: tuple[int, int], size: int,
               noise_prob: float) -> Scene:
    """Two shapes side by side or one above the other, not overlapping."""
    bg, noise = _background(rng, noise_prob)
    horizontal = rng.random() < 0.5
    objs = []
    for k, (color, shape) in enumerate((a, b)):
        big = rng.random() < 0.5
        r = size * (rng.uniform(0.2, 0.235) if big else rng.uniform(0.17, 0.195))
        lo, hi = (k * size / 2 + r + 1, (k + 1) * size / 2 - r - 1)  # own half along the split axis
        along = rng.uniform(lo, max(lo, hi))
        across = rng.uniform(r + 1, size - r - 1)
        cx, cy = (along, across) if horizontal else (across, along)
        objs.append(_make_obj(rng, color, shape, r, cx, cy, "large" if big else "small"))
    relation = "to the left of" if horizontal else "above"
    if rng.random() < 0.5:  # mention the second one first
        objs.reverse()
        relation = "to the right of" if horizontal else "below"
    return Scene(tuple(objs), bg, noise, relation)


def position_name(obj: Obj, size: int) -> str:
    col = "left" if obj.cx < size / 3 else "right" if obj.cx > 2 * size / 3 else ""
    row = "top" if obj.cy < size / 3 else "bottom" if obj.cy > 2 * size / 3 else ""
    return " ".join(w for w in (row, col) if w) or "center"


# --------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------
_NOISE_TILES = 8


@lru_cache(maxsize=8)
def _noise_tiles(size: int) -> np.ndarray:
    """A fixed bank of light noise tiles (int16, amplitude ~8 grey levels)."""
    gen = np.random.default_rng(1234 + size)
    return np.clip(gen.normal(0, 8, (_NOISE_TILES, size, size, 3)), -24, 24).astype(np.int16)


def _polygon(obj: Obj) -> list[tuple[float, float]]:
    name, r = obj.shape_name, obj.r
    if name == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        s = r * 0.78
        pts = [(x * s, y * s) for x, y in pts]
    elif name == "triangle":
        pts = [(r * math.cos(math.radians(a)), r * math.sin(math.radians(a)) + 0.15 * r) for a in (-90, 30, 150)]
    elif name == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.42
            a = math.radians(-90 + 36 * k)
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    elif name == "cross":
        w, l = r * 0.32, r * 0.95
        pts = [(-w, -l), (w, -l), (w, -w), (l, -w), (l, w), (w, w), (w, l), (-w, l), (-w, w), (-l, w),
               (-l, -w), (-w, -w)]
    else:
        raise ValueError(name)
    ca, sa = math.cos(math.radians(obj.angle)), math.sin(math.radians(obj.angle))
    return [(obj.cx + x * ca - y * sa, obj.cy + x * sa + y * ca) for x, y in pts]


def render(scene: Scene, size: int) -> Image.Image:
    """Draw a scene as an RGB PIL image of ``size`` x ``size``."""
    if scene.noise >= 0:
        arr = _noise_tiles(size)[scene.noise] + np.asarray(scene.background, dtype=np.int16)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    else:
        img = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        if obj.shape_name == "circle":
            draw.ellipse((obj.cx - obj.r, obj.cy - obj.r, obj.cx + obj.r, obj.cy + obj.r), fill=obj.rgb)
        else:
            draw.polygon(_polygon(obj), fill=obj.rgb)
    return img
