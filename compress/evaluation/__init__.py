"""Evaluation: zero-shot classification, image-text retrieval, parameters, MACs, throughput.

Usage (the trainer at the end of a run, and ``clip-compress eval``)::

    metrics = evaluate_model(
        model, tokenizer,
        zero_shot_tasks=[ZeroShotTask("imagenet", loader, IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES)],
        retrieval_sets=[RetrievalSet("coco", coco_loader, text_to_image=mapping)],
        device="cuda", precision="bf16",
    )
    # {"zs/imagenet/top1": 62.4, ..., "ret/coco/i2t_r1": ..., "params/vision": ...,
    #  "macs/image": ..., "throughput/pairs_per_s": ...}
"""

from compress.data.tasks import RetrievalSet, ZeroShotTask
from compress.evaluation.efficiency import count_macs, pairs_per_second, throughput
from compress.evaluation.evaluate import evaluate_model
from compress.evaluation.retrieval import (
    RetrievalFeatures,
    encode_retrieval_set,
    recall_at_k,
    retrieval_recall,
    text_identities,
)
from compress.evaluation.zero_shot import (
    IMAGENET_CLASSNAMES,
    LOGIT_SCALE,
    OPENAI_IMAGENET_TEMPLATES,
    zero_shot_accuracy,
    zero_shot_classifier,
)

__all__ = [
    "IMAGENET_CLASSNAMES",
    "LOGIT_SCALE",
    "OPENAI_IMAGENET_TEMPLATES",
    "RetrievalFeatures",
    "RetrievalSet",
    "ZeroShotTask",
    "count_macs",
    "encode_retrieval_set",
    "evaluate_model",
    "pairs_per_second",
    "recall_at_k",
    "retrieval_recall",
    "text_identities",
    "throughput",
    "zero_shot_accuracy",
    "zero_shot_classifier",
]
