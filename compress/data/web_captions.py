"""Web-like caption noise for the synthetic "shapes" data (the second embedded benchmark of issue 20).

Web alt-text is partial and noisy (the reason CLIP-scale data differs from exact captions; cf. Radford et
al., "CLIP", 2021, and the filtering studies of LAION / DataComp). The option ``caption_noise`` makes the
synthetic captions so, each object of a caption independently:

- ``color_only``: names the colour, not the shape ("a red shape");
- ``shape_only``: names the shape, not the colour ("a circle");
- ``wrong_attribute``: one attribute (colour or shape, half each) replaced by another value ("a blue circle"
  for a red circle); with ``holdout`` the wrong value never makes a held-out pair, so held-out pairs stay
  absent from the training text as from its images;

these three exclusive (probabilities summing to at most 1); and per caption, independently:

- ``extra_words``: a web phrase before or after the caption ("stock photo", "free download", ...), none of
  which names a colour or a shape.

``caption_noise: web`` takes :data:`WEB_LEVELS` (chosen once, before any run, as "about half the captions
partial or wrong, a third with boilerplate": not tuned on results). The noise is drawn from a per-sample
generator of its own (stream ``<split>/caption_noise``), so the image and the template of every sample are
those of the exact data; without the option every sample is byte-identical to before.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from compress.data.robust import DataError
from compress.data.shapes import COLOR_NAMES, SHAPES, Scene

#: the exclusive per-object kinds, in the order their probabilities are stacked
OBJECT_KINDS = ("color_only", "shape_only", "wrong_attribute")
#: the benchmark's default levels (``caption_noise: web``)
WEB_LEVELS: dict[str, float] = {"color_only": 0.2, "shape_only": 0.2, "wrong_attribute": 0.1, "extra_words": 0.3}
#: web boilerplate (no colour or shape word in any of them: tested)
EXTRA_PREFIXES = ("stock photo:", "image may contain:", "free download -", "hd wallpaper:", "new listing!")
EXTRA_SUFFIXES = ("stock photo", "vector illustration", "royalty free", "hd wallpaper", "free download",
                  "on sale now", "#art #design", "| 1024x768", "clipart", "high quality")


@dataclass(frozen=True)
class CaptionNoise:
    """Probabilities of each kind of caption noise (see the module docstring)."""

    color_only: float = 0.0
    shape_only: float = 0.0
    wrong_attribute: float = 0.0
    extra_words: float = 0.0

    @classmethod
    def parse(cls, value: Any) -> CaptionNoise | None:
        """``None`` (no noise), ``"web"`` (:data:`WEB_LEVELS`) or a mapping of the kinds to probabilities."""
        if value is None:
            return None
        if value == "web":
            return cls(**WEB_LEVELS)
        known = list(cls.__dataclass_fields__)
        if not isinstance(value, Mapping):
            raise DataError(f"synthetic data: caption_noise must be 'web' or a mapping of {known} to "
                            f"probabilities, got {value!r}")
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise DataError(f"synthetic data: caption_noise: unknown kind(s) {unknown}; known: {known}")
        for key, p in value.items():
            if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
                raise DataError(f"synthetic data: caption_noise.{key} must be a probability in [0, 1], got {p!r}")
        noise = cls(**{k: float(p) for k, p in value.items()})
        if noise.exclusive > 1.0 + 1e-9:
            raise DataError(f"synthetic data: caption_noise: {' + '.join(OBJECT_KINDS)} = {noise.exclusive:g} > 1 "
                            "(an object gets at most one of them)")
        return noise

    @property
    def exclusive(self) -> float:
        return self.color_only + self.shape_only + self.wrong_attribute

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def object_kind(self, rng: random.Random) -> str | None:
        """One of :data:`OBJECT_KINDS`, or None (the object named exactly)."""
        u, edge = rng.random(), 0.0
        for kind in OBJECT_KINDS:
            edge += getattr(self, kind)
            if u < edge:
                return kind
        return None

    def names(self, scene: Scene, rng: random.Random, allowed: frozenset[tuple[int, int]] | None = None,
              ) -> list[tuple[str | None, str | None]]:
        """What the caption calls each object: (colour word or None, shape word or None). ``allowed``: the
        colour-shape pairs a wrong attribute may name (None: all)."""
        out: list[tuple[str | None, str | None]] = []
        for obj in scene.objects:
            kind = self.object_kind(rng)
            color, shape = obj.color, obj.shape
            if kind == "color_only":
                out.append((COLOR_NAMES[color], None))
                continue
            if kind == "shape_only":
                out.append((None, SHAPES[shape]))
                continue
            if kind == "wrong_attribute":
                color, shape = _wrong(rng, color, shape, allowed)
            out.append((COLOR_NAMES[color], SHAPES[shape]))
        return out

    def extra(self, text: str, rng: random.Random) -> str:
        """``text`` with a web phrase before or after it (probability ``extra_words``)."""
        if rng.random() >= self.extra_words:
            return text
        if rng.random() < 0.5:
            return f"{rng.choice(EXTRA_PREFIXES)} {text}"
        return f"{text} {rng.choice(EXTRA_SUFFIXES)}"


def _wrong(rng: random.Random, color: int, shape: int, allowed: frozenset[tuple[int, int]] | None,
           ) -> tuple[int, int]:
    """The pair with its colour (or, half the time, its shape) replaced by another value; a replacement that
    would name a pair outside ``allowed`` is not drawn (the other attribute is changed if none is left)."""
    colors = [(c, shape) for c in range(len(COLOR_NAMES)) if c != color and (allowed is None or (c, shape) in allowed)]
    shapes = [(color, s) for s in range(len(SHAPES)) if s != shape and (allowed is None or (color, s) in allowed)]
    first, second = (colors, shapes) if rng.random() < 0.5 else (shapes, colors)
    return rng.choice(first or second)
