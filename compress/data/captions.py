"""Captions and zero-shot prompts for the "shapes" world.

Every caption names the colour and the shape of each object ("a large red circle in the
top left", "a small blue square next to a green star", "a photo of the red circle").
Retrieval uses the ``full`` style (size, colour, shape and position or relation), which is
the least ambiguous one.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from compress.data.shapes import COLOR_NAMES, SHAPES, Obj, Scene, position_name

_SINGLE = (
    "{a_size_obj} in the {pos}",
    "a photo of {a_obj}",
    "a photo of the {obj}",
    "{a_obj}",
    "the {obj}",
    "{a_size_obj}",
    "an image of {a_obj} on a grey background",
    "the {obj} in the {pos} of the image",
    "a drawing of {a_size_obj}",
    "there is {a_obj} in the {pos}",
    "{a_obj} shape",
    "a picture of the {size_obj}",
)

_PAIR = (
    "{a1} next to {a2}",
    "{a1} and {a2}",
    "{a1} {rel} {a2}",
    "{s1} {rel} {s2}",
    "a photo of {a1} and {a2}",
    "two shapes: {a1} and {a2}",
    "the {p1} is {rel} the {p2}",
)

SHAPE_TEMPLATES = ("a photo of a {}.", "a {}.", "an image of a {}.", "a drawing of a {}.", "the {}.")
COLOR_TEMPLATES = ("a photo of the {} shape.", "the {} shape.", "a {} shape.", "an image of something {}.")
COLOR_SHAPE_TEMPLATES = ("a photo of the {}.", "the {}.", "a photo of a {}.", "an image of the {}.", "a {}.")


def article(phrase: str) -> str:
    """'a' or 'an' + phrase."""
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


#: what a caption calls each object: (colour word or None, shape word or None); None drops that word
Names = Sequence[tuple[str | None, str | None]]


def object_phrase(color: str | None, shape: str | None) -> str:
    """'red circle'; 'red shape' when the shape is not named, 'circle' when the colour is not."""
    return " ".join(w for w in (color, shape or "shape") if w)


def _single(obj: Obj, name: tuple[str | None, str | None], pos: str, rng: random.Random, style: str) -> str:
    phrase = object_phrase(*name)
    sized = f"{obj.size_word} {phrase}"
    fields = {"obj": phrase, "a_obj": article(phrase), "size_obj": sized, "a_size_obj": article(sized), "pos": pos}
    template = _SINGLE[0] if style == "full" else rng.choice(_SINGLE)
    # colour only: "a red shape", not "a red shape shape" (no exact caption holds "shape shape")
    return template.format(**fields).replace("shape shape", "shape")


def _pair(scene: Scene, names: Names, rng: random.Random, style: str) -> str:
    o1, o2 = scene.objects
    p1, p2 = object_phrase(*names[0]), object_phrase(*names[1])
    fields = {
        "a1": article(p1),
        "a2": article(p2),
        "s1": article(f"{o1.size_word} {p1}"),
        "s2": article(f"{o2.size_word} {p2}"),
        "p1": p1,
        "p2": p2,
        "rel": scene.relation,
    }
    template = "{s1} {rel} {s2}" if style == "full" else rng.choice(_PAIR)
    return template.format(**fields)


def caption(scene: Scene, size: int, rng: random.Random, style: str = "random", names: Names | None = None) -> str:
    """A caption for a scene; ``style``: ``random`` (varied templates) or ``full``. ``names`` (one per object,
    default each object's true colour and shape) is what the caption calls the objects (the caption noise of
    :mod:`compress.data.web_captions`); the template is drawn from ``rng`` the same way whatever they are."""
    names = names or [(o.color_name, o.shape_name) for o in scene.objects]
    if len(scene.objects) == 1:
        return _single(scene.objects[0], names[0], position_name(scene.objects[0], size), rng, style)
    return _pair(scene, names, rng, style)


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
