"""Image transforms, built from each model's own preprocess config (``model.visual.preprocess_cfg``).

Evaluation: open_clip's ``image_transform_v2(cfg, is_train=False)`` with the model's size,
mean/std, interpolation, resize mode and fill colour. Training (TinyCLIP's recipe, which is
also open_clip's training transform): ``RandomResizedCrop(size, scale=(0.9, 1.0), bicubic)``,
to tensor, the model's mean/std.

Distillation with a teacher and a student that preprocess differently (size, mean/std):
:class:`DistillTransform` draws the random crop once, in the source image's coordinates, then
resizes that same view to each model's size and normalises it with each model's constants,
so the teacher sees exactly the content the student sees (TinyCLIP feeds both the same
augmented image). The sample is then ``{"images": student view, "teacher_images": teacher
view}``. When the two training transforms are identical, one tensor serves both. A teacher ensemble's member k
with a view of its own reads ``teacher_images/k`` (:func:`teacher_view_key`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.transform import PreprocessCfg, image_transform_v2
from torch import nn
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from compress.models.export import preprocess_config
from compress.models.forward import model_list

CLIP_MEAN: tuple[float, ...] = tuple(OPENAI_DATASET_MEAN)
CLIP_STD: tuple[float, ...] = tuple(OPENAI_DATASET_STD)
#: TinyCLIP's (and open_clip's) RandomResizedCrop scale range
TRAIN_SCALE = (0.9, 1.0)
_RATIO = (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop default, as open_clip uses it


def _hw(size: Any) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int | float) else (int(size[0]), int(size[-1]))


def preprocess_of(model: nn.Module) -> PreprocessCfg:
    """The model's preprocess config; the size is the one its vision tower is built for
    (``visual.image_size``), as open_clip itself sets it."""
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in preprocess_config(model).items()}
    visual = getattr(model, "visual", model)
    size = getattr(visual, "image_size", None)
    if size is not None:
        cfg["size"] = size
    cfg["size"] = _hw(cfg["size"])
    known = set(PreprocessCfg.__dataclass_fields__)
    return PreprocessCfg(**{k: v for k, v in cfg.items() if k in known})


def _as_cfg(cfg: PreprocessCfg | int) -> PreprocessCfg:
    """An int is a size with OpenAI's constants (synthetic checks and tests)."""
    return PreprocessCfg(size=_hw(cfg)) if isinstance(cfg, int) else cfg


def train_transform(cfg: PreprocessCfg | int, scale: tuple[float, float] = TRAIN_SCALE) -> T.Compose:
    """TinyCLIP's training augmentation with the model's size and normalisation (open_clip's
    training transform: ``RandomResizedCrop(scale, bicubic)``, RGB, to tensor, normalise)."""
    return image_transform_v2(_as_cfg(cfg), is_train=True, aug_cfg={"scale": tuple(scale)})


def eval_transform(cfg: PreprocessCfg | int) -> T.Compose:
    """open_clip's evaluation transform for the model's preprocess config (resize by its mode
    and interpolation, centre crop or pad, RGB, to tensor, normalise)."""
    return image_transform_v2(_as_cfg(cfg), is_train=False)


def eval_transform_for(model: nn.Module) -> T.Compose:
    """The evaluation transform of ``model`` (its own preprocess config)."""
    return eval_transform(preprocess_of(model))


def _train_view(cfg: PreprocessCfg) -> tuple[tuple[int, int], tuple[float, ...], tuple[float, ...]]:
    """What a training transform depends on: size, mean, std (the crop is always bicubic and
    ignores the resize mode, as open_clip's training transform does)."""
    mean = cfg.mean if isinstance(cfg.mean, list | tuple) else (cfg.mean,) * 3
    std = cfg.std if isinstance(cfg.std, list | tuple) else (cfg.std,) * 3
    return _hw(cfg.size), tuple(float(m) for m in mean), tuple(float(s) for s in std)


#: a crop box in the source image's pixels: (top, left, height, width), as ``RandomResizedCrop.get_params`` draws it
Box = tuple[int, int, int, int]


class CropViews:
    """One random crop, several views: ``{name: view}``, one per model that reads the image.

    The crop box is drawn once (``RandomResizedCrop.get_params``, torch's CPU generator: :meth:`draw`) in
    the source image's coordinates, then resized (bicubic) to each view's size and normalised with its
    mean/std (:meth:`apply`); for each model alone this is exactly its ``RandomResizedCrop`` training
    transform. A size is resized once however many views share it. :meth:`apply` with a stored box replays
    a view (the teacher-output cache stores the boxes its teachers saw)."""

    def __init__(self, views: Mapping[str, PreprocessCfg], scale: tuple[float, float] = TRAIN_SCALE):
        self.views = {name: _train_view(cfg) for name, cfg in views.items()}
        self.scale = tuple(scale)

    @staticmethod
    def _resized(crop: Any, size: tuple[int, int]) -> torch.Tensor:
        return TF.to_tensor(TF.resize(crop, list(size), interpolation=T.InterpolationMode.BICUBIC, antialias=True))

    def draw(self, img: Any) -> Box:
        """A crop box for ``img`` from torch's CPU generator (seed it to make the draw a function of a key)."""
        top, left, height, width = T.RandomResizedCrop.get_params(img, list(self.scale), list(_RATIO))
        return int(top), int(left), int(height), int(width)

    def apply(self, img: Any, box: Box) -> dict[str, torch.Tensor]:
        """Every view of the crop ``box`` of ``img``."""
        img = img.convert("RGB") if getattr(img, "mode", "RGB") != "RGB" else img
        crop = TF.crop(img, *box)
        raw: dict[tuple[int, int], torch.Tensor] = {}
        out = {}
        for name, (size, *norm) in self.views.items():
            if size not in raw:
                raw[size] = self._resized(crop, size)
            out[name] = TF.normalize(raw[size], *norm)
        return out

    def __call__(self, img: Any) -> dict[str, torch.Tensor]:
        return self.apply(img, self.draw(img))

    def only(self, *names: str) -> CropViews:
        """The same crop in the views ``names`` alone (each made exactly as here)."""
        out = CropViews({}, self.scale)
        out.views = {name: self.views[name] for name in names}
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale}, views={self.views})"


class DistillTransform(CropViews):
    """One random crop, two views: ``{"images": student's, "teacher_images": teacher's}`` (:class:`CropViews`)."""

    def __init__(self, student: PreprocessCfg, teacher: PreprocessCfg, scale: tuple[float, float] = TRAIN_SCALE):
        super().__init__({"images": student, "teacher_images": teacher}, scale)


def same_training_view(student: nn.Module, teacher: nn.Module) -> bool:
    """Whether the two models' training views of a crop are the same tensor (size, mean and std agree)."""
    return _train_view(preprocess_of(teacher)) == _train_view(preprocess_of(student))


def teacher_view_key(index: int) -> str:
    """The batch entry of teacher ``index``'s own view: ``teacher_images`` for the first teacher, ``teacher_images/k``
    for member k of an ensemble. A teacher whose training view is the student's has none: it reads ``images``."""
    return "teacher_images" if index == 0 else f"teacher_images/{index}"


def training_views(student: nn.Module, teacher: nn.Module | Sequence[nn.Module] | None = None
                   ) -> dict[str, PreprocessCfg]:
    """The views a training crop is prepared in: ``images`` for the student and, for each teacher (one, or each
    member of an ensemble) whose size or normalisation differs from the student's, :func:`teacher_view_key`."""
    teachers = model_list(teacher)
    views = {"images": preprocess_of(student)}
    for k, model in enumerate(teachers):
        if not same_training_view(student, model):
            views[teacher_view_key(k)] = preprocess_of(model)
    return views


def train_transform_for(student: nn.Module, teacher: nn.Module | Sequence[nn.Module] | None = None) -> Any:
    """The training transform of a distillation run: the student's own, or, when a teacher (one, or each member of
    an ensemble) needs another size or normalisation, one crop in several views (:class:`CropViews`,
    :func:`training_views`; :class:`DistillTransform` for one teacher)."""
    views = training_views(student, teacher)
    if len(views) == 1:
        return train_transform(views["images"])
    if list(views) == ["images", "teacher_images"]:
        return DistillTransform(views["images"], views["teacher_images"])
    return CropViews(views)
