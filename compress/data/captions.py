"""Captions and zero-shot prompts for the "shapes" world.

Every caption names the colour and the shape of each object ("a large red circle in the
top left", "a small blue square next to a green star", "a photo of the red circle").
Retrieval uses the ``full`` style (size, colour, shape and position or relation), which is
the least ambiguous one.
"""

from __future__ import annotations

import random

from compress.data.shapes import COLOR_NAMES, SHAPES, Obj, Scene, position_name

_SINGLE = (
    "{a_size} {color} {shape} in the {pos}",
    "a photo of {a_color} {shape}",
    "a photo of the {color} {shape}",
    "{a_color} {shape}",
    "the {color} {shape}",
    "{a_size} {color} {shape}",
    "an image of {a_color} {shape} on a grey background",
    "the {color} {shape} in the {pos} of the image",
    "a drawing of {a_size} {color} {shape}",
    "there is {a_color} {shape} in the {pos}",
    "{a_color} {shape} shape",
    "a picture of the {size} {color} {shape}",
)

_PAIR = (
    "{a1} next to {a2}",
    "{a1} and {a2}",
    "{a1} {rel} {a2}",
    "{s1} {rel} {s2}",
    "a photo of {a1} and {a2}",
    "two shapes: {a1} and {a2}",
    "the {c1} {n1} is {rel} the {c2} {n2}",
)

SHAPE_TEMPLATES = ("a photo of a {}.", "a {}.", "an image of a {}.", "a drawing of a {}.", "the {}.")
COLOR_TEMPLATES = ("a photo of the {} shape.", "the {} shape.", "a {} shape.", "an image of something {}.")
COLOR_SHAPE_TEMPLATES = ("a photo of the {}.", "the {}.", "a photo of a {}.", "an image of the {}.", "a {}.")


def article(phrase: str) -> str:
    """'a' or 'an' + phrase."""
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def _single(obj: Obj, pos: str, rng: random.Random, style: str) -> str:
    fields = {
        "color": obj.color_name,
        "shape": obj.shape_name,
        "size": obj.size_word,
        "pos": pos,
        "a_color": article(obj.color_name),
        "a_size": article(obj.size_word),
    }
    template = _SINGLE[0] if style == "full" else rng.choice(_SINGLE)
    return template.format(**fields)


def _pair(scene: Scene, rng: random.Random, style: str) -> str:
    o1, o2 = scene.objects
    rel = scene.relation
    fields = {
        "a1": article(f"{o1.color_name} {o1.shape_name}"),
        "a2": article(f"{o2.color_name} {o2.shape_name}"),
        "s1": article(f"{o1.size_word} {o1.color_name} {o1.shape_name}"),
        "s2": article(f"{o2.size_word} {o2.color_name} {o2.shape_name}"),
        "c1": o1.color_name,
        "n1": o1.shape_name,
        "c2": o2.color_name,
        "n2": o2.shape_name,
        "rel": rel,
    }
    template = "{s1} {rel} {s2}" if style == "full" else rng.choice(_PAIR)
    return template.format(**fields)


def caption(scene: Scene, size: int, rng: random.Random, style: str = "random") -> str:
    """A caption for a scene; ``style``: ``random`` (varied templates) or ``full``."""
    if len(scene.objects) == 1:
        return _single(scene.objects[0], position_name(scene.objects[0], size), rng, style)
    return _pair(scene, rng, style)


def task_classnames(task: str) -> list[str]:
    """Class names of a synthetic zero-shot task (``shape``, ``color``, ``color_shape``)."""
    if task == "shape":
        return list(SHAPES)
    if task == "color":
        return list(COLOR_NAMES)
    if task == "color_shape":
        return [f"{c} {s}" for c in COLOR_NAMES for s in SHAPES]
    raise ValueError(f"unknown synthetic task {task!r}; known: shape, color, color_shape")


def task_templates(task: str) -> list[str]:
    return list({"shape": SHAPE_TEMPLATES, "color": COLOR_TEMPLATES}.get(task, COLOR_SHAPE_TEMPLATES))
