"""Evaluation sets: zero-shot classification tasks and image-text retrieval sets.

Templates are strings with a ``{}`` placeholder: the evaluator builds the prompts of class
``c`` as ``[t.format(c) for t in task.templates]`` (open_clip's 80 OpenAI templates are
stored as lambdas; :func:`~compress.data.folder.imagenet_preset` turns them into strings).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from torch.utils.data import Dataset

import compress.data.shapes as shapes
from compress.config import DataConfig, DatasetConfig, ZeroShotTaskConfig
from compress.data.captions import task_classnames, task_templates
from compress.data.collate import Tokenizer, make_collate, make_label_collate
from compress.data.datasets import build_dataset, dataset_name
from compress.data.folder import FOLDER_TEMPLATES, ImageFolderDataset, folder_classnames, imagenet_preset
from compress.data.loader import build_eval_loader
from compress.data.robust import DataError
from compress.data.synthetic import DEFAULT_EVAL_SAMPLES, ShapesClassification, ShapesOptions

#: a prompt template: a ``str.format`` string with one ``{}``, or a callable (open_clip's lambdas)
Template = str | Callable[[str], str]


@dataclass
class ZeroShotTask:
    """A zero-shot classification set: ``loader`` yields ``(images, labels)`` (or dicts with
    ``images`` / ``labels``); ``label_subsets`` name groups of TRUE labels reported separately
    (``{"heldout": {...}, "seen": {...}}``: labels never seen in training, synthetic ``color_shape``)."""

    name: str
    loader: Iterable[Any]
    classnames: Sequence[str]
    templates: Sequence[Template]
    label_subsets: Mapping[str, Iterable[int]] | None = None
    topk: tuple[int, ...] = (1, 5)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def dataset(self) -> Dataset | None:
        """The data set behind ``loader`` when it is a data loader."""
        return getattr(self.loader, "dataset", None)

    @property
    def heldout_labels(self) -> list[int]:
        return sorted((self.label_subsets or {}).get("heldout", ()))

    def prompts(self, classname: str) -> list[str]:
        return [t.format(classname) if isinstance(t, str) else t(classname) for t in self.templates]


@dataclass
class RetrievalSet:
    """An image-text retrieval set: ``loader`` yields ``(images, tokens)`` (or dicts with
    ``images`` / ``texts``); ``text_to_image[j]`` is the image of text ``j`` (loader order),
    ``None`` for pairs / [B, K, L] tokens."""

    name: str
    loader: Iterable[Any]
    text_to_image: Sequence[int] | None = None
    ks: tuple[int, ...] = (1, 5, 10)
    chunk_size: int = field(default=1024, repr=False)
    #: also clip_benchmark's row-rule recalls (``row/i2t_r{k}``; :func:`compress.evaluation.retrieval.recall_at_k`)
    row_rule: bool = False

    @property
    def dataset(self) -> Dataset | None:
        """The data set behind ``loader`` when it is a data loader."""
        return getattr(self.loader, "dataset", None)


def _synthetic_source(data: DataConfig | None) -> tuple[DatasetConfig, int, bool]:
    """Synthetic settings for evaluation sets, their size, and whether training held out
    the held-out pairs (only a synthetic training set with ``holdout: true`` does)."""
    train = data.train if data is not None else DatasetConfig()
    val = data.val if data is not None else None
    if val is not None and val.kind == "synthetic":
        source, n = val, val.num_samples or DEFAULT_EVAL_SAMPLES
    else:
        source, n = (train if train.kind == "synthetic" else DatasetConfig()), DEFAULT_EVAL_SAMPLES
    holdout = train.kind == "synthetic" and ShapesOptions.from_dict(train.options).holdout
    return source, n, holdout


def _templates(given: list[str] | None, default: list[str]) -> list[str]:
    if not given:
        return list(default)
    out = [t.replace("{c}", "{}") for t in given]
    bad = [t for t in out if "{}" not in t]
    if bad:
        raise DataError(f"zero-shot templates need a '{{}}' placeholder: {bad}")
    return out


def _wds_classification(task: ZeroShotTaskConfig, transform: Any) -> tuple[Dataset, list[str], list[str]]:
    """A clip_benchmark webdataset folder (``path``) with its class names and templates (``{}`` form)."""
    from compress.data.benchmark_sets import WdsEvalSet

    if not task.path:
        raise DataError(f"zero-shot task {task.name!r}: 'path' to a clip_benchmark webdataset folder is required")
    ds = WdsEvalSet(task.path, transform)
    if ds.kind != "classification":
        raise DataError(f"zero-shot task {task.name!r}: {task.path} is a {ds.kind} set, not classification")
    classnames, templates = ds.info.classnames or [], ds.info.templates or []
    if not (task.classnames or classnames) or not (task.templates or templates):
        raise DataError(f"zero-shot task {task.name!r}: {task.path} lacks classnames.txt or "
                        "zeroshot_classification_templates.txt (give classnames / templates in the config)")
    return ds, list(classnames or task.classnames or []), [t.replace("{c}", "{}") for t in templates]


def build_zero_shot_task(
    task: ZeroShotTaskConfig, transform: Any, data: DataConfig | None = None, batch_size: int = 128,
    num_workers: int = 0, max_bad_fraction: float = 0.01,
) -> ZeroShotTask:
    """A zero-shot task from its config, its loader yielding in-order batches ``{"images",
    "labels", "num_bad", "num_samples"}`` of ``batch_size``.

    - ``kind: synthetic``, ``task``: ``shape`` | ``color`` | ``color_shape`` (default). The
      seed, size and ``num_samples`` come from ``data.val`` if it is synthetic, else from
      ``data.train``; 40 single-shape images per pair and 1000 images by default.
    - ``kind: folder`` with ``path`` (ImageNet layout); ``task: imagenet`` (or ``kind:
      imagenet``) uses open_clip's 1000 class names and 80 OpenAI templates, otherwise
      the folder names and a small template set.
    - ``kind: wds`` with ``path``: a clip_benchmark webdataset folder (``wds_imagenet1k``) with its
      own ``classnames.txt`` and ``zeroshot_classification_templates.txt``.
    ``classnames`` / ``templates`` in the config override the defaults.
    """
    if task.kind == "synthetic":
        source, n, holdout = _synthetic_source(data)
        name = task.task or "color_shape"
        ds = ShapesClassification(name, source.seed, "val", n, transform, ShapesOptions.from_dict(source.options))
        classnames, templates = task_classnames(name), task_templates(name)
        heldout = shapes.heldout_labels() if holdout and name == "color_shape" else []
        info = {"heldout_combos": sorted(shapes.combo_name(k) for k in shapes.heldout_labels()) if holdout else []}
    elif task.kind in ("folder", "imagenet"):
        if not task.path:
            raise DataError(f"zero-shot task {task.name!r}: 'path' to an image folder is required")
        folder = ImageFolderDataset(task.path, transform)
        ds, heldout, info = folder, [], {"class_dirs": folder.class_dirs}
        if task.kind == "imagenet" or task.task == "imagenet":
            classnames, templates = imagenet_preset()
            if len(folder.class_dirs) != len(classnames):
                raise DataError(
                    f"zero-shot task {task.name!r}: the imagenet preset needs {len(classnames)} class "
                    f"folders, {task.path} has {len(folder.class_dirs)}"
                )
        else:
            classnames, templates = folder_classnames(folder.class_dirs), list(FOLDER_TEMPLATES)
    elif task.kind == "wds":
        ds, classnames, templates = _wds_classification(task, transform)
        heldout, info = [], {"path": task.path}
    else:
        raise DataError(f"zero-shot task {task.name!r}: kind {task.kind!r} is not synthetic, folder, imagenet or wds")
    if task.classnames:
        if len(task.classnames) != len(classnames):
            raise DataError(
                f"zero-shot task {task.name!r}: {len(task.classnames)} class names given, "
                f"the data set has {len(classnames)} classes"
            )
        classnames = list(task.classnames)
    subsets = {"heldout": set(heldout), "seen": set(range(len(classnames))) - set(heldout)} if heldout else None
    loader = build_eval_loader(
        ds, batch_size, make_label_collate(), num_workers, f"zero-shot:{task.name}", max_bad_fraction
    )
    return ZeroShotTask(task.name, loader, classnames, _templates(task.templates, templates), subsets, info=info)


def build_retrieval_set(
    data: DataConfig | DatasetConfig, transform: Any, name: str | None = None, *, tokenizer: Tokenizer | None = None,
    batch_size: int = 128, num_workers: int = 0,
) -> RetrievalSet | None:
    """The retrieval set: ``data.val`` (a ``DataConfig``) or the given ``DatasetConfig``; its
    loader yields in-order batches ``{"images", "texts", "captions", ...}`` (texts tokenized
    by ``tokenizer``).

    Synthetic: the validation split with ``full`` captions (size, colour, shape, place;
    1000 images unless ``num_samples``). CSV / webdataset: the file's pairs in order.
    Returns ``None`` for a ``DataConfig`` without ``val`` unless its training data is
    synthetic (then the synthetic validation split is used, with exact captions whatever the
    training data's ``caption_noise``).
    """
    if isinstance(data, DataConfig):
        cfg = data.val
        if cfg is None:
            if data.train.kind != "synthetic":
                return None
            options = {k: v for k, v in data.train.options.items() if k != "caption_noise"}  # exact captions
            cfg = replace(data.train, num_samples=None, options=options)
    else:
        cfg = data
    if cfg.kind == "synthetic":
        options = {"caption_style": "full", **cfg.options}
        cfg = replace(cfg, split="val", options=options)
        ds = build_dataset(cfg, transform, split="val")
    elif cfg.kind in ("csv", "webdataset"):
        ds = build_dataset(cfg, transform, shuffle=False)
    else:
        raise DataError(f"retrieval needs image-text data (synthetic, csv, webdataset), got {cfg.kind!r}")
    name = name or f"retrieval:{dataset_name(cfg)}"
    loader = build_eval_loader(
        ds, batch_size, make_collate(tokenizer), num_workers, name, cfg.max_bad_fraction, cfg.bad_window
    )
    return RetrievalSet(name, loader)
