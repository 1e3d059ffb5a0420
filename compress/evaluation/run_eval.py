"""Evaluation at the end of a run (and for ``clip-compress eval``): config -> tasks -> metrics."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.config import DataConfig, EvalConfig
from compress.data.tasks import RetrievalSet, ZeroShotTask, build_retrieval_set, build_zero_shot_task
from compress.data.transforms import eval_transform_for
from compress.evaluation.evaluate import evaluate_model
from compress.models.forward import tokenizer_for


def build_eval_sets(
    eval_cfg: EvalConfig, data: DataConfig | None, model: nn.Module, tokenizer: Any
) -> tuple[list[ZeroShotTask], list[RetrievalSet]]:
    """The zero-shot tasks and retrieval sets a config asks for, as loaders."""
    eval_tf = eval_transform_for(model)  # the model's own size and normalisation
    bs = eval_cfg.batch_size
    tasks = [build_zero_shot_task(task_cfg, eval_tf, data, bs) for task_cfg in eval_cfg.zero_shot]
    retrieval = []
    if eval_cfg.retrieval and data is not None:
        ret = build_retrieval_set(data, eval_tf, name="val", tokenizer=tokenizer, batch_size=bs)
        if ret is not None:
            retrieval.append(ret)
    return tasks, retrieval


def evaluate_prepared(
    model: nn.Module,
    sets: tuple[list[ZeroShotTask], list[RetrievalSet]],
    eval_cfg: EvalConfig,
    device: torch.device,
    precision: str = "fp32",
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` on sets built beforehand by :func:`build_eval_sets`."""
    tasks, retrieval = sets
    return evaluate_model(
        model.to(device),
        tokenizer_for(model),
        zero_shot_tasks=tasks,
        retrieval_sets=retrieval,
        device=device,
        precision=precision,
        measure_params=eval_cfg.params,
        measure_macs=eval_cfg.macs,
        measure_throughput=eval_cfg.throughput,
        progress=progress,
    )


def evaluate_with(
    model: nn.Module, eval_cfg: EvalConfig, data: DataConfig | None, device: torch.device, precision: str = "fp32",
    progress: bool = False,
) -> dict[str, Any]:
    """Build the sets ``eval_cfg`` and ``data`` ask for, then evaluate ``model`` on them."""
    sets = build_eval_sets(eval_cfg, data, model, tokenizer_for(model))
    return evaluate_prepared(model, sets, eval_cfg, device, precision, progress)
