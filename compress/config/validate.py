"""Checks the dataclasses cannot make: plug-in names and parameters, ranges, combinations.

Everything here runs before any model is built, so a wrong config fails in a second with one
line naming the key, not after the models are loaded or after hours of training. Plug-ins are
built once here with the engine's context, so their constructors' value checks run too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from compress.config.errors import ConfigError
from compress.config.schema import (
    DATASET_KINDS,
    SCHEMA_VERSION,
    SYNTHETIC_TASKS,
    ModelSpec,
    RunConfig,
)
from compress.registry import INHERITANCE, LOSSES, SCHEDULES, Registry, RegistryError, suggest

#: parameters the engine supplies to schedule constructors when they declare them
SCHEDULE_CONTEXT = ("base_value", "total_steps")
#: parameters the engine supplies to loss constructors when they declare them (known once models exist)
LOSS_CONTEXT = ("student_embed_dim", "teacher_embed_dim")
#: parameters the engine supplies to inheritance constructors when they declare them
INHERITANCE_CONTEXT = ("total_steps",)


def _build_plugin(registry: Registry[Any], spec: Any, where: str, context: Mapping[str, Any] | None = None) -> Any:
    """Build the plug-in once so that its constructor checks its values; errors name ``where``."""
    try:
        return registry.validate(spec, context)
    except RegistryError as e:
        raise ConfigError(f"{where}: {e}") from None


def inheritance_context(cfg: RunConfig) -> dict[str, Any]:
    """What the engine offers an inheritance constructor (``total_steps``: ``train.steps``)."""
    return {"total_steps": cfg.train.steps}


def schedule_context(cfg: RunConfig, key: str) -> dict[str, Any]:
    """What the engine offers the constructor of ``schedules.<key>``: ``total_steps`` (``train.steps``)
    and ``base_value``: ``train.lr`` for ``lr``, the loss's configured ``weight`` for ``weight/<loss>``."""
    context: dict[str, Any] = {"total_steps": cfg.train.steps}
    if key == "lr":
        context["base_value"] = cfg.train.lr
    elif key in (weight_keys := loss_weight_keys(cfg.losses)):
        context["base_value"] = float(dict(cfg.losses[weight_keys[key]]).get("weight", 1.0))
    return context


def validate(cfg: RunConfig) -> RunConfig:
    """Check what the dataclasses cannot: plug-in names, their parameters and values, ranges."""
    if cfg.schema_version != SCHEMA_VERSION:
        raise ConfigError(
            f"schema_version: this clip-compress reads version {SCHEMA_VERSION}, the config has "
            f"{cfg.schema_version}"
        )
    if cfg.stages:  # every stage runs as its own resolved config: check those
        from compress.config.stages import resolve_stages

        resolve_stages(cfg)
        return cfg
    _check_train(cfg)
    inheritance = _build_plugin(INHERITANCE, cfg.inheritance, "inheritance", inheritance_context(cfg))
    _check_models(cfg, inheritance)
    if not cfg.losses:
        raise ConfigError("losses: at least one loss term is needed")
    for i, spec in enumerate(cfg.losses):
        params = dict(spec)
        weight = params.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ConfigError(f"losses[{i}].weight: expected a number, got {weight!r}")
        if not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"losses[{i}].weight: must be a finite number >= 0, got {weight!r}")
        _build_plugin(LOSSES, params, f"losses[{i}]")
    _check_schedules(cfg)
    if cfg.teacher is None and any(LOSSES.get(LOSSES.split_spec(s)[0]).needs_teacher for s in _loss_specs(cfg)):
        raise ConfigError("teacher: the configured losses need a teacher, but teacher is null")
    _check_data(cfg)
    _check_eval(cfg)
    return cfg


#: ``train.accum_inputs``: read a step's micro-batches again with a second loader, or keep them on the host
ACCUM_INPUTS = ("reread", "keep")


def _check_train(cfg: RunConfig) -> None:
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


def _check_models(cfg: RunConfig, inheritance: Any) -> None:
    """Teacher weights, and a student exactly where the inheritance strategy reads one."""
    name = cfg.inheritance["name"] if isinstance(cfg.inheritance, Mapping) else cfg.inheritance
    if cfg.teacher is not None:
        _check_teacher(cfg.teacher)
        _check_model_name(cfg.teacher, "teacher")
    if getattr(inheritance, "needs_student_config", True):
        if cfg.student is None:
            raise ConfigError(f"student: inheritance {name!r} needs a student architecture (student.model)")
        _check_model_name(cfg.student, "student")
        if cfg.student.random_init:
            raise ConfigError(
                "student.random_init: only a teacher can be asked to be random; a student is built "
                "randomly and then filled by its inheritance strategy"
            )
    elif cfg.student is not None:
        raise ConfigError(
            f"student: inheritance {name!r} derives the student from its source (the teacher); "
            "remove student (or set it to null)"
        )
    if getattr(inheritance, "needs_source", True) and cfg.teacher is None:
        raise ConfigError(
            f"teacher: inheritance {name!r} takes the student's weights from the teacher, but teacher is null"
        )
    if cfg.teacher is not None and cfg.student is not None and getattr(inheritance, "needs_student_config", True):
        _check_tokenizers(cfg.teacher, cfg.student)


def _check_tokenizers(teacher: ModelSpec, student: ModelSpec) -> None:
    """Teacher and student must read the same token ids (open_clip's tokenizer config: the HF tokenizer
    name, its options, vocabulary size, context length); a model whose config is not known before it is
    loaded (a checkpoint without metadata) is checked when the run loads it."""
    from compress.models.forward import tokenizer_mismatch

    configs = [model_config_of(spec) for spec in (teacher, student)]
    if configs[0] is not None and configs[1] is not None:
        problem = tokenizer_mismatch(configs[0], configs[1])
        if problem:
            raise ConfigError(f"student.model: {problem}")


def model_config_of(spec: ModelSpec) -> dict[str, Any] | None:
    """The open_clip config of a model spec read without its weights (an architecture name, a config
    JSON, a checkpoint's metadata, an exported folder's config file), ``None`` where it is unknown."""
    from pathlib import Path

    from compress.models.factory import (
        OPEN_CLIP_CONFIG_FILE,
        ModelLoadError,
        checkpoint_config,
        get_model_config,
        read_config_file,
        resolve_spec,
    )
    from compress.models.nonuniform import is_nonuniform_folder, read_nonuniform_config

    try:
        kind, name, _ = resolve_spec(spec.model, spec.pretrained)
        path = Path(name)
        if kind == "named":
            return get_model_config(name)
        if kind == "exported":
            if is_nonuniform_folder(path):
                return dict(read_nonuniform_config(path)["model_cfg"])
            return read_config_file(path / OPEN_CLIP_CONFIG_FILE) if (path / OPEN_CLIP_CONFIG_FILE).is_file() else None
        if not path.is_file():
            return None
        return read_config_file(path) if path.suffix == ".json" else checkpoint_config(path)
    except (ModelLoadError, OSError, ValueError, KeyError):
        return None


def _check_model_name(spec: ModelSpec, where: str) -> None:
    """An architecture name must be known (a typo fails here, not after the teacher is loaded)."""
    from pathlib import Path

    from compress.models.factory import ModelLoadError, get_model_config, resolve_spec

    try:
        kind, name, _ = resolve_spec(spec.model, spec.pretrained)
        if kind == "named":
            if "/" in name and not Path(name).exists():
                raise ConfigError(f"{where}.model: no such file or folder: {name}")
            get_model_config(name)
    except ModelLoadError as e:
        raise ConfigError(f"{where}.model: {e}") from None


def _check_teacher(spec: ModelSpec) -> None:
    """A teacher without weights distils from noise: refused unless ``random_init: true`` says so."""
    from pathlib import Path

    from compress.models.factory import ModelLoadError, has_weights

    try:
        weighted = has_weights(spec.model, spec.pretrained)
    except ModelLoadError as e:
        raise ConfigError(f"teacher.model: {e}") from None
    if weighted and spec.random_init:
        raise ConfigError(
            f"teacher.random_init: true, but teacher {spec.model!r} loads weights "
            f"{'(' + spec.pretrained + ') ' if spec.pretrained else ''}; drop one of the two"
        )
    if not weighted and not spec.random_init:
        typo = "/" in spec.model and not Path(spec.model).exists()
        missing = f" (no such file or folder: {spec.model})" if typo else ""
        raise ConfigError(
            f"teacher.model: {spec.model!r} has no weights{missing}: it is an architecture without "
            "a @tag, a pretrained checkpoint, a checkpoint file or an exported folder, so the student would "
            "distil from a random teacher; give weights, or set teacher.random_init: true if that is intended"
        )


#: zero-shot task kinds the evaluation builds
ZERO_SHOT_KINDS = ("synthetic", "folder", "imagenet")


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
            raise ConfigError(f"eval.zero_shot[{i}].path: a {task.kind} task needs the path of an image folder")
        known = SYNTHETIC_TASKS if task.kind == "synthetic" else ("imagenet",)  # a folder: its own class names
        if task.task is not None and task.task not in known:
            raise ConfigError(
                f"eval.zero_shot[{i}].task: {task.task!r} is not a {task.kind} task (known: {', '.join(known)})."
                f"{suggest(task.task, list(known))}"
            )


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


def _check_schedules(cfg: RunConfig) -> None:
    """``schedules``: ``lr`` (required; base value ``train.lr``) and ``weight/<loss>`` (base value
    the loss's ``weight``); each a schedule plug-in whose parameters fit its constructor."""
    if "lr" not in cfg.schedules:
        raise ConfigError("schedules.lr: a learning-rate schedule is required")
    weight_keys = loss_weight_keys(cfg.losses)
    scheduled: dict[int, str] = {}
    for key, spec in cfg.schedules.items():
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
        _build_plugin(SCHEDULES, spec, f"schedules.{key}", schedule_context(cfg, key))


def _loss_specs(cfg: RunConfig) -> list[dict[str, Any]]:
    return [{k: v for k, v in dict(s).items() if k != "weight"} for s in cfg.losses]
