"""Validation of one config without stages: its plug-ins (names, parameters, the values their constructors
check, the context they declare) and the models they need, with the config's own checks
(:mod:`compress.config.validate`) in between, in the order a config's errors have always been reported.

Everything here runs before any model is built, so a wrong config fails in a second with one line naming the
key. Plug-ins are built once here with the engine's context, so their constructors' value checks run too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from compress.config.errors import ConfigError
from compress.config.schema import ModelSpec, RunConfig
from compress.config.specs import split_loss
from compress.config.validate import check_loss_weight, check_schedule_keys, check_sections, check_train
from compress.recipe.context import (
    INHERITANCE_CONTEXT,
    LOSS_CONTEXT,
    check_context,
    check_target_declared,
    config_loss_context,
    inheritance_context,
    offered,
    schedule_context,
)
from compress.registry import INHERITANCE, LOSSES, SCHEDULES, Registry, RegistryError


def build_plugin(registry: Registry[Any], spec: Any, where: str, context: Mapping[str, Any] | None = None) -> Any:
    """Build the plug-in once so that its constructor checks its values; errors name ``where``."""
    try:
        return registry.validate(spec, context)
    except RegistryError as e:
        raise ConfigError(f"{where}: {e}") from None


def _declared(registry: Registry[Any], spec: Any, where: str, supplied: tuple[str, ...]) -> None:
    try:
        check_context(registry, spec, where, supplied)
    except RegistryError as e:
        raise ConfigError(f"{where}: {e}") from None


def validate_one(cfg: RunConfig) -> RunConfig:
    """Check a config without stages (a run's, or one stage's resolved config)."""
    check_train(cfg)
    _declared(INHERITANCE, cfg.inheritance, "inheritance", INHERITANCE_CONTEXT)
    check_target_declared(cfg.inheritance, "inheritance")
    inheritance = build_plugin(INHERITANCE, cfg.inheritance, "inheritance",
                               offered(INHERITANCE, cfg.inheritance, inheritance_context(cfg)))
    _check_models(cfg, inheritance)
    if not cfg.losses:
        raise ConfigError("losses: at least one loss term is needed")
    for i, spec in enumerate(cfg.losses):
        params = check_loss_weight(i, spec)
        _declared(LOSSES, params, f"losses[{i}]", LOSS_CONTEXT)
        _check_reads_ensemble(cfg, params, f"losses[{i}]")
        loss = build_plugin(LOSSES, params, f"losses[{i}]", offered(LOSSES, params, config_loss_context(cfg)))
        _check_cached_outputs(cfg, loss, f"losses[{i}]")
    for key in check_schedule_keys(cfg):
        build_plugin(SCHEDULES, cfg.schedules[key], f"schedules.{key}", schedule_context(cfg, key))
    if cfg.teacher is None and any(LOSSES.get(LOSSES.split_spec(s)[0]).needs_teacher for s in _loss_specs(cfg)):
        raise ConfigError("teacher: the configured losses need a teacher, but teacher is null")
    check_sections(cfg)
    _check_synthetic_options(cfg)
    return cfg


def _check_synthetic_options(cfg: RunConfig) -> None:
    """The options of a ``synthetic`` data set (``caption_noise`` among them), as the data set reads them: a
    mistake there is refused with the config, not when the data is opened after the models are built."""
    from compress.data.robust import DataError
    from compress.data.synthetic import ShapesOptions

    for where, ds in (("data.train", cfg.data.train), ("data.val", cfg.data.val)):
        if ds is not None and ds.kind == "synthetic":
            try:
                ShapesOptions.from_dict(ds.options)
            except (DataError, TypeError, ValueError) as error:
                raise ConfigError(f"{where}.options: {error}") from None


def _check_reads_ensemble(cfg: RunConfig, params: Mapping[str, Any], where: str) -> None:
    """With a teacher ensemble every loss that reads a teacher must read the ensemble (``reads_ensemble``)."""
    if len(cfg.teachers) < 2:
        return
    name = LOSSES.split_spec(params)[0]
    try:
        loss = LOSSES.get(name)
    except RegistryError as e:
        raise ConfigError(f"{where}: {e}") from None
    if getattr(loss, "needs_teacher", True) and not getattr(loss, "reads_ensemble", False):
        raise ConfigError(
            f"{where}: loss {name!r} does not read a teacher ensemble (reads_ensemble is False), so with "
            f"{len(cfg.teachers)} teachers it would distil from teachers[0] alone: use a loss that reads ensembles "
            "(affinity) or one teacher"
        )


def _check_cached_outputs(cfg: RunConfig, loss: Any, where: str) -> None:
    """A loss that reads a teacher output the teacher cache does not store is refused before anything runs."""
    cache = cfg.teacher_cache
    if cache is None or not cache.reads_cache or not loss.needs_teacher:
        return
    missing = sorted(set(loss.needs) - set(cache.outputs))
    if missing:
        raise ConfigError(
            f"{where}: {type(loss).__name__} reads the teacher's {', '.join(missing)}, which the teacher cache does "
            f"not store: add it to teacher_cache.outputs (a new cache) or use teacher_cache.mode: online"
        )


def _loss_specs(cfg: RunConfig) -> list[dict[str, Any]]:
    return [split_loss(s)[0] for s in cfg.losses]


def _check_models(cfg: RunConfig, inheritance: Any) -> None:
    """Teacher weights, and a student exactly where the inheritance strategy reads one."""
    name = cfg.inheritance["name"] if isinstance(cfg.inheritance, Mapping) else cfg.inheritance
    if cfg.teacher is not None:
        _check_teacher(cfg.teacher)
        _check_model_name(cfg.teacher, "teacher")
    for k, spec in enumerate(cfg.teachers[1:], start=1):  # teachers[0] is teacher, checked above
        _check_teacher(spec, f"teachers[{k}]")
        _check_model_name(spec, f"teachers[{k}]")
    if inheritance.needs_student_config:
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
    if inheritance.needs_source and cfg.teacher is None:
        raise ConfigError(
            f"teacher: inheritance {name!r} takes the student's weights from the teacher, but teacher is null"
        )
    if cfg.teacher is not None and cfg.student is not None and inheritance.needs_student_config:
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


def _check_teacher(spec: ModelSpec, where: str = "teacher") -> None:
    """A teacher without weights distils from noise: refused unless ``random_init: true`` says so."""
    from pathlib import Path

    from compress.models.factory import ModelLoadError, has_weights

    try:
        weighted = has_weights(spec.model, spec.pretrained)
    except ModelLoadError as e:
        raise ConfigError(f"{where}.model: {e}") from None
    if weighted and spec.random_init:
        raise ConfigError(
            f"{where}.random_init: true, but teacher {spec.model!r} loads weights "
            f"{'(' + spec.pretrained + ') ' if spec.pretrained else ''}; drop one of the two"
        )
    if not weighted and not spec.random_init:
        typo = "/" in spec.model and not Path(spec.model).exists()
        missing = f" (no such file or folder: {spec.model})" if typo else ""
        raise ConfigError(
            f"{where}.model: {spec.model!r} has no weights{missing}: it is an architecture without "
            "a @tag, a pretrained checkpoint, a checkpoint file or an exported folder, so the student would "
            f"distil from a random teacher; give weights, or set {where}.random_init: true if that is intended"
        )
