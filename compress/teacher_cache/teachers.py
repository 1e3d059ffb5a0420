"""The teachers a cache is generated from, as a run would have them: loaded after ``seed_everything(cfg.seed)``
(a ``random_init`` teacher is then the run's), frozen, on the run's device under the run's precision
(``train.device``, ``train.precision``), each run by :class:`compress.teacher.OnlineTeacher`: the stored
features are exactly the online teacher's outputs for those images (L2-normalised; the embeddings if asked).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from open_clip.transform import PreprocessCfg
from torch import Tensor, nn

from compress.config import RunConfig
from compress.data.transforms import preprocess_of
from compress.models.forward import EXTRAS, embed_dim, tokenizer_for
from compress.outputs import ClipOutput
from compress.precision import Precision, run_device
from compress.teacher import OnlineTeacher, load_teachers
from compress.teacher_cache.identity import teachers_of


@dataclass
class Teachers:
    """The frozen teachers as they run (:class:`OnlineTeacher` each), their tokenizers and preprocess configs."""

    models: list[nn.Module]
    online: list[OnlineTeacher]
    tokenizers: list[Any]
    preprocess: list[PreprocessCfg]
    device: torch.device
    precision: Precision

    @classmethod
    def load(cls, cfg: RunConfig, outputs: Sequence[str]) -> Teachers:
        device, precision = run_device(cfg)
        models = load_teachers(cfg)
        needs = [o for o in outputs if o in EXTRAS]
        return cls(models, [OnlineTeacher(m, precision, needs) for m in models], [tokenizer_for(m) for m in models],
                   [preprocess_of(m) for m in models], device, precision)

    def manifest_entries(self, cfg: RunConfig) -> list[dict[str, Any]]:
        """``[{model, image_dim, text_dim, logit_scale}]``: the manifest's description of each teacher."""
        entries = []
        for spec, model in zip(teachers_of(cfg), self.models, strict=True):
            dim = embed_dim(model)
            entries.append({"model": spec.model, "pretrained": spec.pretrained, "image_dim": dim, "text_dim": dim,
                            "logit_scale": float(model.logit_scale.detach().exp())})
        return entries

    def forward(self, k: int, images: Tensor, captions: list[str]) -> ClipOutput:
        """Teacher ``k``'s outputs for ``images`` (any number of views) and ``captions`` (its own tokenizer)."""
        texts = self.tokenizers[k](captions)
        batch = {"images": images.to(self.device, non_blocking=True), "texts": texts.to(self.device)}
        return self.online[k](batch)
