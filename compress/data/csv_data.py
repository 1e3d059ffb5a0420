"""open_clip's CSV/TSV format: one row per image, a path column and a caption column.

Columns are ``DatasetConfig.image_key`` / ``caption_key``, the separator ``separator``
(``"\\t"`` for TSV); relative image paths are resolved against the CSV file's folder.
A missing or corrupt image, or an empty caption, gives ``None`` (skipped and counted).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from torch.utils.data import Dataset

from compress.data.robust import DataError, apply_transform, open_image, warn_bad


class MissingColumns(DataError):
    """A CSV/TSV file without the image or caption column it is read with: the ``missing`` names, and the
    ``columns`` it has (one joined column: another separator)."""

    def __init__(self, path: Path, missing: list[str], columns: list[str]) -> None:
        self.path, self.missing, self.columns = path, missing, columns
        super().__init__(f"CSV data set {path}: column(s) {missing} not found; columns are {columns} "
                         "(set data.*.image_key / caption_key / separator)")


def read_pairs(path: str | Path, image_key: str, caption_key: str, separator: str = ",",
               nrows: int | None = None) -> pd.DataFrame:
    """The rows of a CSV/TSV file (``nrows=0``: only its header, to check the columns before a model is loaded),
    refused with :class:`MissingColumns` when it lacks the image or caption column."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"CSV data set: file not found: {path}")
    sep = "\t" if separator in ("\\t", "tab") else separator
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, nrows=nrows)
    except Exception as e:
        raise DataError(f"CSV data set {path}: cannot read: {e}") from None
    missing = [k for k in (image_key, caption_key) if k not in df.columns]
    if missing:
        raise MissingColumns(path, missing, [str(c) for c in df.columns])
    return df


class CsvDataset(Dataset):
    """(image, caption) pairs listed in a CSV/TSV file."""

    def __init__(
        self,
        path: str | Path,
        transform: Any = None,
        image_key: str = "filepath",
        caption_key: str = "title",
        separator: str = ",",
        num_samples: int | None = None,
    ) -> None:
        self.path = Path(path)
        df = read_pairs(self.path, image_key, caption_key, separator)
        if num_samples is not None:
            df = df.iloc[:num_samples]
        root = self.path.parent
        self.images = [str(p if Path(p).is_absolute() else root / p) for p in df[image_key].tolist()]
        self.captions = [str(c) for c in df[caption_key].tolist()]
        self.transform = transform
        if not self.images:
            raise DataError(f"CSV data set {self.path}: no rows")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, str] | None:
        path, text = self.images[index], self.captions[index].strip()
        if not text:
            warn_bad(path, "empty caption")
            return None
        img = open_image(path)
        if img is None:
            return None
        out = apply_transform(self.transform, img, path)
        return None if out is None else (out, text)
