"""Zero-shot classification (CLIP, Radford et al. 2021; as TinyCLIP and open_clip evaluate it).

Class ``c``'s weight is the mean of the L2-normalised text embeddings of its prompts (one
per template), renormalised: w_c = normalize(mean_t normalize(f_text(t(c)))). An image is
classified by logits = 100 * normalize(f_image(x)) @ W (scale 100 as open_clip; the scale
does not change the ranking). Accuracies are percentages. ``mean_per_class_recall`` is the
balanced accuracy (the mean over the classes present in the labels of each class's top-1 recall,
sklearn's ``balanced_accuracy_score``), the main metric DataComp reports for Caltech-101, FGVC
Aircraft, Flowers-102 and Pets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from torch import Tensor, nn

from compress.data.tasks import Template
from compress.evaluation.common import eval_mode, unpack
from compress.precision import Precision, resolve_precision, to_device
from compress.progress import is_terminal, progress_iter

__all__ = [
    "IMAGENET_CLASSNAMES",
    "OPENAI_IMAGENET_TEMPLATES",
    "LOGIT_SCALE",
    "mean_per_class_recall",
    "zero_shot_accuracy",
    "zero_shot_classifier",
]

#: the fixed logit scale of zero-shot classification (open_clip, TinyCLIP)
LOGIT_SCALE = 100.0

class _NormalizedText(nn.Module):
    """``encode_text(tokens, normalize=True)`` for any model with ``encode_text`` (fp32 output)."""

    def __init__(self, model: nn.Module, precision: Precision) -> None:
        super().__init__()
        self.model, self.precision = model, precision

    def encode_text(self, tokens: Tensor, normalize: bool = True) -> Tensor:
        with self.precision.autocast():
            features = self.model.encode_text(tokens).float()
        return F.normalize(features, dim=-1) if normalize else features


def zero_shot_classifier(
    model: nn.Module,
    tokenizer: Callable[[list[str]], Tensor],
    classnames: Sequence[str],
    templates: Sequence[Template],
    device: str | torch.device = "cpu",
    num_classes_per_batch: int | None = 10,
    precision: str = "fp32",
    progress: bool = False,
) -> Tensor:
    """The zero-shot weights ``W`` [E, C] (unit columns), built with
    ``open_clip.build_zero_shot_classifier`` (templates: ``str.format`` strings or callables)."""
    device = torch.device(device)
    with eval_mode(model):
        weights = open_clip.build_zero_shot_classifier(
            _NormalizedText(model, resolve_precision(precision, device)),
            tokenizer,
            classnames=list(classnames),
            templates=list(templates),
            num_classes_per_batch=num_classes_per_batch,
            device=device,
            use_tqdm=progress and is_terminal(),
        )
    return weights.float()


def _count_hits(logits: Tensor, labels: Tensor, ks: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Bool [N, len(ks)]: whether the true label is among the ``k`` highest logits; and bool [N]:
    whether it is the highest (top-1, also when 1 is not among ``ks``)."""
    top = logits.topk(max(ks), dim=-1).indices
    correct = top == labels.view(-1, 1)
    return torch.stack([correct[:, :k].any(dim=-1) for k in ks], dim=1), correct[:, 0]


def mean_per_class_recall(top1_hit: Tensor, labels: Tensor) -> float:
    """Balanced accuracy in percent: the mean over the classes present in ``labels`` of the share
    of that class's samples classified correctly (``top1_hit``); NaN without samples."""
    if labels.numel() == 0:
        return float("nan")
    classes, index = torch.unique(labels, return_inverse=True)
    hits = torch.zeros(len(classes), dtype=torch.float64).index_add_(0, index, top1_hit.double())
    counts = torch.bincount(index, minlength=len(classes)).double()
    return (hits / counts).mean().item() * 100.0


@torch.inference_mode()
def zero_shot_accuracy(
    model: nn.Module,
    classifier: Tensor,
    loader: Iterable[Any],
    device: str | torch.device = "cpu",
    topk: Sequence[int] = (1, 5),
    label_subsets: Mapping[str, Iterable[int]] | None = None,
    progress: bool = False,
    precision: str = "fp32",
    desc: str = "zero-shot",
) -> dict[str, float]:
    """Top-k accuracy in percent: ``{"top1", "top5", "top1_<subset>", "top5_<subset>", ...}``, and
    ``mean_per_class_recall`` (balanced top-1 accuracy over all samples, percent).

    ``loader`` yields ``(images, labels)`` (or dicts with ``images`` / ``labels``);
    ``classifier`` is [E, C]; top-k is reported only for ``k <= C``. ``label_subsets``
    (e.g. ``{"heldout": {...}, "seen": {...}}``) restricts the samples to those whose TRUE
    label is in the subset; the prediction is still over all C classes. An empty subset
    gives NaN. ``desc`` names the progress lines (the set: ``zero-shot imagenet``)."""
    device = torch.device(device)
    num_classes = classifier.shape[1]
    ks = sorted({int(k) for k in topk if int(k) <= num_classes})
    if not ks:
        raise ValueError(f"no k in topk={tuple(topk)} is <= the number of classes ({num_classes})")
    classifier = classifier.to(device=device, dtype=torch.float32)
    policy = resolve_precision(precision, device)
    hits, firsts, all_labels = [], [], []
    with eval_mode(model):
        for batch in progress_iter(loader, desc, progress):
            images, labels = unpack(batch, ("labels",))
            images, labels = to_device(images, device), torch.as_tensor(labels, device=device)
            with policy.autocast():
                features = model.encode_image(images)
            logits = LOGIT_SCALE * F.normalize(features.float(), dim=-1) @ classifier
            hit, first = _count_hits(logits, labels, ks)
            hits.append(hit.cpu())
            firsts.append(first.cpu())
            all_labels.append(labels.cpu())
    if not hits:
        raise ValueError("the zero-shot loader yielded no batches")
    hit, label = torch.cat(hits), torch.cat(all_labels)
    out = _accuracies(hit, ks, "")
    out["mean_per_class_recall"] = mean_per_class_recall(torch.cat(firsts), label)
    for name, subset in (label_subsets or {}).items():
        members = torch.as_tensor(sorted(int(c) for c in subset), dtype=label.dtype)
        out.update(_accuracies(hit[torch.isin(label, members)], ks, f"_{name}"))
    return out


def _accuracies(hit: Tensor, ks: Sequence[int], suffix: str) -> dict[str, float]:
    if hit.shape[0] == 0:
        return {f"top{k}{suffix}": float("nan") for k in ks}
    rates = hit.float().mean(dim=0) * 100.0
    return {f"top{k}{suffix}": rates[i].item() for i, k in enumerate(ks)}
