"""Image-folder classification sets in the ImageNet layout (``root/<class_dir>/*.jpg``).

Class directories are sorted (for ImageNet: by WordNet id), which is the order of
open_clip's ``IMAGENET_CLASSNAMES``; the ``imagenet`` preset takes those 1000 names and
the 80 OpenAI templates. Otherwise class names come from the folder names (underscores
become spaces) with a small generic template set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from compress.data.robust import DataError, apply_transform, open_image

FOLDER_TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "an image of a {}.", "a picture of a {}.")


def imagenet_preset() -> tuple[list[str], list[str]]:
    """open_clip's 1000 ImageNet class names and 80 OpenAI templates (``{}`` placeholders)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    templates = [t("{}") if callable(t) else str(t) for t in OPENAI_IMAGENET_TEMPLATES]
    return list(IMAGENET_CLASSNAMES), templates


def folder_classnames(class_dirs: list[str]) -> list[str]:
    return [d.replace("_", " ").strip() for d in class_dirs]


class ImageFolderDataset(Dataset):
    """(image, label) pairs of an image folder; an unreadable image gives ``None``."""

    def __init__(self, root: str | Path, transform: Any = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"image folder not found: {self.root}")
        try:
            self.class_dirs, class_to_idx = find_classes(self.root)
            self.samples = make_dataset(self.root, class_to_idx, extensions=IMG_EXTENSIONS)
        except (FileNotFoundError, OSError) as e:
            raise DataError(f"image folder {self.root}: {e}") from None
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    def __getitem__(self, index: int) -> tuple[Any, int] | None:
        path, label = self.samples[index]
        img = open_image(path)
        if img is None:
            return None
        out = apply_transform(self.transform, img, path)
        return None if out is None else (out, label)


class FolderTextDataset(ImageFolderDataset):
    """An image folder as image-text pairs: the caption is a template filled with the class
    name (template ``index mod len(templates)``), for training on classification data."""

    def __init__(self, root: str | Path, transform: Any = None, templates: list[str] | None = None) -> None:
        super().__init__(root, transform)
        self.classnames = folder_classnames(self.class_dirs)
        self.templates = list(templates or FOLDER_TEMPLATES)

    def __getitem__(self, index: int) -> tuple[Any, str] | None:
        item = super().__getitem__(index)
        if item is None:
            return None
        image, label = item
        return image, self.templates[index % len(self.templates)].format(self.classnames[label])
