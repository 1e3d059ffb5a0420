"""The embedded synthetic evaluation sets written in clip_benchmark's webdataset format, so
clip_benchmark (or DataComp's evaluator) and ``clip-compress eval --tasks`` read the same images,
class names, templates and captions.

``export_synthetic(root)`` writes, under ``root``:

- ``wds_shapes_color_shape``, ``wds_shapes_shape``, ``wds_shapes_color``: the zero-shot tasks of
  ``kind: synthetic`` (:class:`~compress.data.synthetic.ShapesClassification`: sample ``i`` shows
  colour-shape pair ``i mod 40``), with their class names and templates;
- ``wds_shapes_retrieval``: the retrieval view of the validation split (``caption_style: full``,
  one caption per image), as ``build_retrieval_set`` evaluates a synthetic run.

Images are the rendered pixels (``size``, 64 by default) saved as PNG (lossless): the evaluation
transform resizes them exactly as it resizes the in-memory images.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from compress.config.schema import SYNTHETIC_TASKS
from compress.data.benchmark_sets import write_wds_classification, write_wds_retrieval
from compress.data.captions import task_classnames, task_templates
from compress.data.synthetic import DEFAULT_EVAL_SAMPLES, ShapesClassification, ShapesDataset, ShapesOptions

#: the set name prefix of the exported synthetic sets
PREFIX = "shapes"


def synthetic_set_names(tasks: Sequence[str] = SYNTHETIC_TASKS, retrieval: bool = True) -> list[str]:
    """The clip_benchmark data set names :func:`export_synthetic` writes."""
    return [f"{PREFIX}_{t}" for t in tasks] + ([f"{PREFIX}_retrieval"] if retrieval else [])


def _class_images(ds: ShapesClassification) -> Iterator[Image.Image]:
    for i in range(len(ds)):
        yield ds[i][0]


def _pairs(ds: ShapesDataset) -> Iterator[tuple[Image.Image, list[str]]]:
    for i in range(len(ds)):
        image, text = ds.pil(i)
        yield image, [text]


def export_synthetic(
    root: str | Path,
    *,
    seed: int = 0,
    num_samples: int | None = None,
    options: dict[str, Any] | None = None,
    tasks: Sequence[str] = SYNTHETIC_TASKS,
    retrieval: bool = True,
    shard_size: int = 10_000,
) -> dict[str, Path]:
    """Write the synthetic zero-shot tasks (and the retrieval set) of ``seed`` in clip_benchmark's
    format under ``root``; ``{set name: folder}``. ``num_samples`` defaults to 1000 per set, as the
    evaluation of a synthetic run; ``options`` are the synthetic data options (``size``, ``noise``...)."""
    opts = ShapesOptions.from_dict(dict(options or {}))
    n = num_samples or DEFAULT_EVAL_SAMPLES
    out: dict[str, Path] = {}
    for task in tasks:
        ds = ShapesClassification(task, seed, "val", n, None, opts)
        name = f"{PREFIX}_{task}"
        out[name] = write_wds_classification(
            root, name, _class_images(ds), (ds.label(i) for i in range(n)), task_classnames(task),
            task_templates(task), shard_size=shard_size,
        )
    if retrieval:
        # as build_retrieval_set: the full captions unless the options say otherwise
        ret_opts = ShapesOptions.from_dict({"caption_style": "full", **(options or {})})
        ds = ShapesDataset(seed, "val", n, None, ret_opts)
        pairs = list(_pairs(ds))
        name = f"{PREFIX}_retrieval"
        out[name] = write_wds_retrieval(
            root, name, (p[0] for p in pairs), (p[1] for p in pairs), shard_size=shard_size
        )
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m compress.data.benchmark_export ROOT [--seed N] [--num-samples N] [--size PX]``."""
    parser = argparse.ArgumentParser(description="Write the synthetic evaluation sets in clip_benchmark's format.")
    parser.add_argument("root", help="the data root (one wds_<name> folder per set is written in it)")
    parser.add_argument("--seed", type=int, default=0, help="the data seed (the demo validates on seed 1)")
    parser.add_argument("--num-samples", type=int, default=None, help=f"images per set ({DEFAULT_EVAL_SAMPLES})")
    parser.add_argument("--size", type=int, default=None, help="rendered image size in pixels (64)")
    args = parser.parse_args(argv)
    options = {"size": args.size} if args.size else {}
    for name, path in export_synthetic(args.root, seed=args.seed, num_samples=args.num_samples,
                                       options=options).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
