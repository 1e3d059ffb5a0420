"""The config's own checks that the dataclasses cannot make: ranges and combinations of its sections.

Pure data: nothing here knows a plug-in. The checks that need the plug-ins (their names, parameters and
values, the models they need) are the Recipe's (:mod:`compress.recipe.checks`), which calls these in order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

from compress.config.errors import ConfigError, suggest
from compress.config.schema import (
    CACHE_DTYPES,
    CACHE_MODES,
    CACHE_OUTPUTS,
    DATASET_KINDS,
    REPORT_TO,
    SCHEMA_VERSION,
    SYNTHETIC_TASKS,
    RunConfig,
)
from compress.config.specs import split_loss


def check_version(cfg: RunConfig) -> None:
    """``schema_version``: the one this code reads."""
    if cfg.schema_version != SCHEMA_VERSION:
        raise ConfigError(
            f"schema_version: this clip-compress reads version {SCHEMA_VERSION}, the config has "
            f"{cfg.schema_version}"
        )


def check_loss_weight(index: int, spec: Any) -> dict[str, Any]:
    """``losses[index].weight`` a finite number >= 0; returns the loss's spec without it."""
    params, weight = split_loss(spec)
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise ConfigError(f"losses[{index}].weight: expected a number, got {weight!r}")
    if not math.isfinite(weight) or weight < 0:
        raise ConfigError(f"losses[{index}].weight: must be a finite number >= 0, got {weight!r}")
    return params


def check_sections(cfg: RunConfig) -> None:
    """The data, teacher-cache and evaluation sections (the last checks of a config; dispatch is checked as it
    is parsed)."""
    _check_data(cfg)
    _check_teacher_cache(cfg)
    _check_eval(cfg)


def _check_teacher_cache(cfg: RunConfig) -> None:
    """``teacher_cache``: its values, a teacher to cache, and a training set whose samples have a stable index."""
    cache = cfg.teacher_cache
    if cache is None:
        return
    for key, allowed in (("mode", CACHE_MODES), ("dtype", CACHE_DTYPES)):
        value = getattr(cache, key)
        if value not in allowed:
            raise ConfigError(f"teacher_cache.{key}: {value!r} is not one of {', '.join(allowed)}."
                              f"{suggest(str(value), list(allowed))}")
    for key in ("num_augmentations", "shard_size"):
        if getattr(cache, key) < 1:
            raise ConfigError(f"teacher_cache.{key}: must be at least 1, got {getattr(cache, key)}")
    unknown = [o for o in cache.outputs if o not in CACHE_OUTPUTS]
    if unknown:
        raise ConfigError(f"teacher_cache.outputs: {unknown[0]!r} is not one of {', '.join(CACHE_OUTPUTS)}."
                          f"{suggest(unknown[0], list(CACHE_OUTPUTS))}")
    needed = [o for o in ("image_features", "text_features") if o not in cache.outputs]
    if needed:
        raise ConfigError(f"teacher_cache.outputs: must hold {' and '.join(needed)} (every distillation loss reads "
                          "them)")
    if len(set(cache.outputs)) != len(cache.outputs):
        raise ConfigError(f"teacher_cache.outputs: an output is listed twice: {cache.outputs}")
    if cfg.teacher is None:
        raise ConfigError("teacher_cache: there is no teacher to cache (teacher is null)")
    if cfg.data.train.kind == "webdataset":
        raise ConfigError(
            "teacher_cache: the training set is webdataset shards, whose samples have no stable index for a cache "
            "yet; use a map-style set (synthetic, csv, folder) or drop teacher_cache"
        )


#: ``train.accum_inputs``: read a step's micro-batches again with a second loader, or keep them on the host
ACCUM_INPUTS = ("reread", "keep")


def check_train(cfg: RunConfig) -> None:
    """Ranges of the optimiser and loop settings (AdamW: Loshchilov & Hutter, ICLR 2019)."""
    t = cfg.train
    for key in ("steps", "batch_size", "accum_steps", "log_every", "max_nonfinite_in_row"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key}: must be at least 1, got {getattr(t, key)}")
    if t.checkpoint_every < 0:
        raise ConfigError(f"train.checkpoint_every: must be >= 0 (0: only at the end), got {t.checkpoint_every}")
    if not cfg.output.save_checkpoint and (cfg.output.keep_every or cfg.output.keep_checkpoints):
        raise ConfigError(
            "output.keep_every / output.keep_checkpoints: output.save_checkpoint is false, so there are no "
            "checkpoints to keep; drop them or save checkpoints"
        )
    if cfg.output.keep_every < 0:
        raise ConfigError(f"output.keep_every: must be >= 0 (0: the newest only), got {cfg.output.keep_every}")
    if t.batch_size % t.accum_steps:
        raise ConfigError(
            f"train.batch_size ({t.batch_size}) must be divisible by train.accum_steps ({t.accum_steps})"
        )
    if t.accum_inputs not in ACCUM_INPUTS:
        raise ConfigError(
            f"train.accum_inputs: {t.accum_inputs!r} is not one of {', '.join(ACCUM_INPUTS)} (how the gradient "
            f"cache's live pass gets a step's micro-batches again).{suggest(t.accum_inputs, list(ACCUM_INPUTS))}"
        )
    _check_report_to(t.report_to)
    if t.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(
            f"train.precision: {t.precision!r} is not one of auto, fp32, bf16, fp16."
            f"{suggest(t.precision, ['auto', 'fp32', 'bf16', 'fp16'])}"
        )
    _check_device(t.device)
    if not (math.isfinite(t.lr) and t.lr >= 0):
        raise ConfigError(f"train.lr: must be a finite number >= 0, got {t.lr}")
    if not (math.isfinite(t.weight_decay) and t.weight_decay >= 0):
        raise ConfigError(f"train.weight_decay: must be a finite number >= 0, got {t.weight_decay}")
    if not (math.isfinite(t.eps) and t.eps > 0):
        raise ConfigError(f"train.eps: must be a number > 0, got {t.eps}")
    for i, beta in enumerate(t.betas):
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"train.betas[{i}]: must be in [0, 1), got {beta}")
    if t.grad_clip is not None and not (math.isfinite(t.grad_clip) and t.grad_clip >= 0):
        raise ConfigError(f"train.grad_clip: must be a number >= 0 (0 or null: no clipping), got {t.grad_clip}")


#: zero-shot task kinds the evaluation builds
ZERO_SHOT_KINDS = ("synthetic", "folder", "imagenet", "wds")


def _check_eval(cfg: RunConfig) -> None:
    if cfg.eval.batch_size < 1:
        raise ConfigError(f"eval.batch_size: must be at least 1, got {cfg.eval.batch_size}")
    for i, task in enumerate(cfg.eval.zero_shot):
        if task.kind not in ZERO_SHOT_KINDS:
            raise ConfigError(
                f"eval.zero_shot[{i}].kind: {task.kind!r} is not one of {', '.join(ZERO_SHOT_KINDS)}."
                f"{suggest(task.kind, list(ZERO_SHOT_KINDS))}"
            )
        if task.kind != "synthetic" and not task.path:
            what = "a clip_benchmark webdataset folder" if task.kind == "wds" else "an image folder"
            raise ConfigError(f"eval.zero_shot[{i}].path: a {task.kind} task needs the path of {what}")
        # a folder: its own class names; a wds folder: its classnames.txt and templates
        known = SYNTHETIC_TASKS if task.kind == "synthetic" else () if task.kind == "wds" else ("imagenet",)
        if task.task is not None and task.task not in known:
            raise ConfigError(
                f"eval.zero_shot[{i}].task: {task.task!r} is not a {task.kind} task (known: {', '.join(known)})."
                f"{suggest(task.task, list(known))}"
            )


def _check_report_to(names: list[str]) -> None:
    """``train.report_to``: known trackers, each once (whether their packages are installed is asked where the run
    starts, :func:`compress.tracking.require_trackers`)."""
    for i, name in enumerate(names):
        if name not in REPORT_TO:
            raise ConfigError(f"train.report_to[{i}]: {name!r} is not one of {', '.join(REPORT_TO)}."
                              f"{suggest(name, list(REPORT_TO))}")
    if len(set(names)) != len(names):
        raise ConfigError(f"train.report_to: a tracker is listed twice: {names}")


def _check_device(name: str) -> None:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (whether this machine has it is asked where the run, or
    its dry run, starts: :func:`compress.precision.available_device`)."""
    kind, _, index = name.partition(":")
    if name == "auto" or (kind in ("cpu", "cuda", "mps") and (not index or index.isdigit())):
        return
    raise ConfigError(f"train.device: {name!r} is not auto, cpu, cuda, cuda:N or mps")


def _check_data(cfg: RunConfig) -> None:
    """Ranges of the data settings (the data sets themselves are opened before training)."""
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers: must be at least 0, got {cfg.data.num_workers}")
    for where, ds in (("data.train", cfg.data.train), ("data.val", cfg.data.val)):
        if ds is None:
            continue
        if ds.kind not in DATASET_KINDS:
            raise ConfigError(
                f"{where}.kind: {ds.kind!r} is not one of {', '.join(DATASET_KINDS)}."
                f"{suggest(ds.kind, list(DATASET_KINDS))}"
            )
        if isinstance(ds.max_bad_fraction, bool) or not 0.0 <= ds.max_bad_fraction < 1.0:
            raise ConfigError(f"{where}.max_bad_fraction: must be a fraction in [0, 1), got {ds.max_bad_fraction}")
        if ds.bad_window < 1:
            raise ConfigError(f"{where}.bad_window: must be at least 1 sample, got {ds.bad_window}")
        if ds.num_samples is not None and ds.num_samples < 1:
            raise ConfigError(f"{where}.num_samples: must be at least 1 (or null for all), got {ds.num_samples}")


#: ``schedules`` key of a loss weight: ``weight/<loss name>`` (or ``weight/<loss index>``)
WEIGHT_PREFIX = "weight/"


def loss_weight_keys(losses: list[Mapping[str, Any]]) -> dict[str, int]:
    """The ``schedules`` keys that set a loss term's weight -> the term's index in ``losses``:
    ``weight/<name>`` for a loss name used once, ``weight/<index>`` for every term."""
    names = [spec.get("name") if isinstance(spec, Mapping) else spec for spec in losses]
    keys = {f"{WEIGHT_PREFIX}{name}": i for i, name in enumerate(names) if names.count(name) == 1}
    keys.update({f"{WEIGHT_PREFIX}{i}": i for i in range(len(losses))})
    return keys


def check_schedule_keys(cfg: RunConfig) -> Iterator[str]:
    """``schedules``: ``lr`` (required; base value ``train.lr``) and ``weight/<loss>`` (base value the loss's
    ``weight``), at most one per loss; yields each key once it is checked (the caller then builds its plug-in)."""
    if "lr" not in cfg.schedules:
        raise ConfigError("schedules.lr: a learning-rate schedule is required")
    weight_keys = loss_weight_keys(cfg.losses)
    scheduled: dict[int, str] = {}
    for key in cfg.schedules:
        if key != "lr" and key not in weight_keys:
            names = [k for k in weight_keys if not k[len(WEIGHT_PREFIX):].isdigit()]
            shared = key.startswith(WEIGHT_PREFIX) and any(
                isinstance(s, Mapping) and s.get("name") == key[len(WEIGHT_PREFIX):] for s in cfg.losses
            )
            why = "two losses share that name: address one by index" if shared else "unknown schedule key"
            raise ConfigError(
                f"schedules.{key}: {why}.{suggest(key, ['lr', *names])} Valid keys: lr, "
                f"{', '.join(names + ['weight/<loss index>'])}"
            )
        if key != "lr":
            index = weight_keys[key]
            if index in scheduled:
                raise ConfigError(f"schedules.{key}: losses[{index}] already has a schedule ({scheduled[index]})")
            scheduled[index] = key
        yield key
