"""Image transforms: TinyCLIP's training augmentation and open_clip's evaluation transform.

Training (TinyCLIP, sec. 6 of the recipe): ``RandomResizedCrop(size, scale=(0.9, 1.0),
bicubic)``, to tensor, CLIP normalisation. Evaluation: ``open_clip.image_transform(size,
is_train=False)`` (resize shorter side bicubic, centre crop, normalise).
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision import transforms as T

from compress.models.forward import image_size_of

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class _ToRGB:
    """Convert a PIL image to RGB (no-op for RGB)."""

    def __call__(self, img: Any) -> Any:
        return img.convert("RGB") if getattr(img, "mode", "RGB") != "RGB" else img

    def __repr__(self) -> str:
        return "ToRGB()"


def train_transform(
    size: int,
    scale: tuple[float, float] = (0.9, 1.0),
    mean: tuple[float, ...] = CLIP_MEAN,
    std: tuple[float, ...] = CLIP_STD,
) -> T.Compose:
    """TinyCLIP's training augmentation."""
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
            _ToRGB(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def eval_transform(size: int) -> Any:
    """open_clip's evaluation transform (resize, centre crop, CLIP normalisation)."""
    import open_clip

    return open_clip.image_transform(size, is_train=False)


def transforms_for(model: Any, image_size: int | None = None) -> tuple[T.Compose, Any]:
    """(train, eval) transforms at the model's resolution (or ``image_size``)."""
    size = image_size_of(model, image_size)
    return train_transform(size), eval_transform(size)


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Undo CLIP normalisation of a [..., 3, H, W] tensor (for viewing)."""
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return x * std + mean
