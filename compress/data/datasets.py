"""Data sets from config: a :class:`~compress.config.DatasetConfig` becomes the data set of its kind
(``synthetic``, ``csv``, ``folder``, ``webdataset``), each item an ``(image_tensor, caption)`` pair or
``None`` for a bad sample."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from compress.config import DatasetConfig
from compress.config.schema import DATASET_KINDS
from compress.data.csv_data import CsvDataset
from compress.data.folder import FolderTextDataset
from compress.data.robust import DataError
from compress.data.shards import ShardDataset
from compress.data.synthetic import ShapesDataset, ShapesOptions

_WDS_OPTIONS = ("shuffle_buffer", "image_exts", "text_exts")

def dataset_name(cfg: DatasetConfig, split: str | None = None) -> str:
    return f"{cfg.kind}:{cfg.path or ''}:{split or cfg.split}".replace("::", ":")


def _check_options(cfg: DatasetConfig, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(cfg.options) - set(allowed))
    if unknown:
        raise DataError(f"{cfg.kind} data set: unknown option(s) {unknown}; known: {list(allowed)}")


def build_dataset(
    cfg: DatasetConfig, transform: Any, split: str | None = None, shuffle: bool | None = None
) -> Dataset:
    """A data set of ``(image_tensor, caption)`` items, ``None`` for a bad sample.

    ``split`` defaults to ``cfg.split`` (it selects the synthetic split; for files the path
    names the split). ``shuffle`` (webdataset only) defaults to ``split == "train"``.
    """
    split = split or cfg.split
    if cfg.kind not in DATASET_KINDS:
        raise DataError(f"data set kind {cfg.kind!r} is not one of {', '.join(DATASET_KINDS)}")
    if cfg.kind == "synthetic":
        return ShapesDataset(cfg.seed, split, cfg.num_samples, transform, ShapesOptions.from_dict(cfg.options))
    if not cfg.path:
        raise DataError(f"{cfg.kind} data set: 'path' is required")
    if cfg.kind == "csv":
        _check_options(cfg, ())
        return CsvDataset(cfg.path, transform, cfg.image_key, cfg.caption_key, cfg.separator, cfg.num_samples)
    if cfg.kind == "folder":
        _check_options(cfg, ("templates",))
        return FolderTextDataset(cfg.path, transform, cfg.options.get("templates"))
    _check_options(cfg, _WDS_OPTIONS)
    return ShardDataset(
        cfg.path,
        transform,
        shuffle=(split == "train") if shuffle is None else shuffle,
        seed=cfg.seed,
        num_samples=cfg.num_samples,
        **cfg.options,
    )
