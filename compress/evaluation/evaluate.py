"""One call that evaluates a model and returns flat, prefixed metrics for ``result.json``.

Keys: ``zs/<task>/top1`` (``top5``, ``top1_<subset>``...), ``ret/<set>/i2t_r1`` ...,
``params/{vision,text,token_embedding,total}`` (TinyCLIP's naming: text without its token
embedding), ``macs/{image,text}`` and ``throughput/{images,texts,pairs}_per_s``.
Accuracies and recalls are percentages. Run it on one process (rank 0).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from compress.data.tasks import RetrievalSet, ZeroShotTask
from compress.evaluation.efficiency import count_macs, throughput
from compress.evaluation.retrieval import retrieval_recall
from compress.evaluation.zero_shot import zero_shot_accuracy, zero_shot_classifier
from compress.models.params import parameter_report

__all__ = ["RetrievalSet", "ZeroShotTask", "evaluate_model"]


def evaluate_model(
    model: nn.Module,
    tokenizer: Callable[[list[str]], Tensor] | None = None,
    *,
    zero_shot_tasks: Sequence[ZeroShotTask] = (),
    retrieval_sets: Sequence[RetrievalSet] = (),
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    image_size: int | tuple[int, int] | None = None,
    context_length: int | None = None,
    measure_params: bool = True,
    measure_macs: bool = True,
    measure_throughput: bool = True,
    macs_counter: str = "aten",
    throughput_kwargs: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Zero-shot accuracy, retrieval recall, parameters, MACs and throughput as one flat dict.

    ``model`` (already on ``device``) needs ``encode_image`` / ``encode_text``; the image
    size and context length come from the model unless given. ``tokenizer`` is needed for
    zero-shot tasks only."""
    if zero_shot_tasks and tokenizer is None:
        raise ValueError("zero-shot tasks need a tokenizer")
    metrics: dict[str, float] = {}
    for task in zero_shot_tasks:
        classifier = zero_shot_classifier(
            model, tokenizer, task.classnames, task.templates, device, precision=precision, progress=progress
        )
        accuracy = zero_shot_accuracy(
            model, classifier, task.loader, device, task.topk, task.label_subsets, progress, precision,
            desc=f"zero-shot {task.name}",
        )
        metrics.update({f"zs/{task.name}/{k}": v for k, v in accuracy.items()})
    for rset in retrieval_sets:
        recall = retrieval_recall(
            model, rset.loader, device, rset.ks, rset.text_to_image, precision, rset.chunk_size, progress,
            desc=f"retrieval {rset.name}", row_rule=rset.row_rule,
        )
        metrics.update({f"ret/{rset.name}/{k}": v for k, v in recall.items()})
    if measure_params:
        metrics.update({f"params/{k}": v for k, v in parameter_report(model).items()})
    if measure_macs:
        macs = count_macs(model, image_size, context_length, counter=macs_counter)
        metrics.update({"macs/image": macs["macs_image"], "macs/text": macs["macs_text"]})
    if measure_throughput:
        kwargs = {"device": device, "precision": precision, **(throughput_kwargs or {})}
        rates = throughput(model, image_size, context_length, **kwargs)
        metrics.update({f"throughput/{k}": v for k, v in rates.items()})
    return metrics
