"""The Recipe: a validated config turned into what a run executes, read alike by the plan and the run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.config.identity import hash_identity
from compress.config.schema import RunConfig
from compress.config.stages import ResolvedStage
from compress.recipe.build import build_inheritance, build_losses, build_schedule
from compress.recipe.identity import identity_dict, run_dir_for
from compress.recipe.stages import resolve_stages
from compress.rundir import RunDir

if TYPE_CHECKING:
    from torch import nn


@dataclass
class Recipe:
    """``cfg`` (validated) with its resolved identity (every plug-in spec with its defaults filled in, the local
    model files' fingerprints), the run id cut from it, its run directory, and its stages, each with its source,
    cumulative target and resolved config (a run without stages is one stage, index 0, from the teacher), and the
    builders of their plug-ins. ``--dry-run``'s plan formats it (:mod:`compress.plan`),
    :func:`compress.run.run_experiment` executes it."""

    cfg: RunConfig
    identity: dict[str, Any]
    run_id: str
    stages: list[ResolvedStage]
    staged: bool

    @classmethod
    def of(cls, cfg: RunConfig) -> Recipe:
        resolved = resolve_stages(cfg)
        stages = resolved or [ResolvedStage(0, cfg.name, "teacher", None, cfg)]
        identity = identity_dict(cfg)
        return cls(cfg, identity, hash_identity(identity, 12), stages, bool(resolved))

    @property
    def run_dir(self) -> Path:
        """``output.dir / (output.run_name or NAME-RUNID)`` (the layout inside is :class:`compress.rundir.RunDir`'s)."""
        return run_dir_for(self.cfg, self.run_id)

    @property
    def layout(self) -> RunDir:
        return RunDir(self.run_dir)

    @staticmethod
    def inheritance(cfg: RunConfig) -> Any:
        """A stage's inheritance strategy (``cfg``: the stage's resolved config)."""
        return build_inheritance(cfg)

    @staticmethod
    def losses(cfg: RunConfig, student: nn.Module, teacher: nn.Module | None) -> list[Any]:
        """A stage's loss terms, given the models (their embedding sizes are the losses' context)."""
        return build_losses(cfg, student, teacher)

    @staticmethod
    def teacher_source(cfg: RunConfig, teacher: nn.Module | None, precision: Any, needs: set[str],
                       store: Any = None) -> Any:
        """Where a stage's trainer gets the teacher's outputs (:class:`compress.teacher.TeacherSource`): read from
        the teacher-output cache ``store`` (``teacher_cache.mode: cache``; the teacher never goes to the device),
        the teacher run online, or None without a teacher."""
        from compress.teacher import OnlineTeacher
        from compress.teacher_cache.source import CachedTeacher

        if store is not None:
            manifest = store.manifest
            return CachedTeacher([t["logit_scale"] for t in manifest["teachers"]], manifest["outputs"], needs)
        return OnlineTeacher(teacher, precision, needs) if teacher is not None else None

    @staticmethod
    def schedule(cfg: RunConfig, key: str) -> Any:
        """``schedules.<key>`` of a stage (``lr``, ``weight/<loss>``)."""
        return build_schedule(cfg, key)
