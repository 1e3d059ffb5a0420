"""The contracts that plug-ins implement (losses, inheritance strategies, schedules).

``compress`` defines them; ``strategies`` (and third-party packages) implement them and
register the implementations in ``compress.registry``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn

from compress.outputs import ClipOutput


class DistillLoss(nn.Module):
    """A loss plug-in: ``forward(student, teacher, batch) -> {term name: scalar tensor}``.

    The trainer multiplies every term by the configured weight, sums them, and logs each.
    Features are gathered across ranks with :func:`compress.distributed.gather_with_grad`,
    never by the loss on its own. A term named ``<term>/<part>`` (:func:`is_breakdown`) is a breakdown of a
    term for the log (a per-teacher value, say): the trainer logs it and averages it over ranks but does not add
    it to the objective (return it detached). ``needs_teacher = False`` lets a run without a teacher
    (training from scratch with the CLIP loss alone) skip the teacher's forward pass.
    ``needs`` names optional :class:`ClipOutput` extras the loss reads (``image_embeds``...).
    The loss runs once per optimizer step over the whole step's outputs (gradient accumulation
    included); ``batch`` then holds the step's texts and other per-sample entries, not its images
    (:func:`compress.step_inputs.step_batch`).
    """

    needs_teacher: bool = True
    needs: tuple[str, ...] = ()
    #: whether the loss reads a teacher ensemble (``teachers:`` with two or more models): the teacher output's
    #: ``members`` (:class:`~compress.outputs.ClipOutput`). A loss that does not is refused with an ensemble (it
    #: would silently distil from the first teacher alone).
    reads_ensemble: ClassVar[bool] = False
    #: constructor parameters left out of the run id while they are at their default: parameters added after run
    #: ids were published, so that those ids stay (a value other than the default is in the id)
    identity_optional: ClassVar[tuple[str, ...]] = ()
    #: the values the engine supplies to the constructor (parameters of the same names), declared here once:
    #: ``student_embed_dim``, ``teacher_embed_dim`` (the models' embedding sizes). They are known only once the
    #: models are built, so validation builds the loss without them: such a parameter needs a default (None).
    #: A name the engine does not supply, or one the constructor does not take, is refused when the config is read.
    context: ClassVar[tuple[str, ...]] = ()
    #: the (local rows x global batch) similarity matrices the loss computes per step, the teacher's and
    #: the student's (what :mod:`compress.memory` counts; each keeps one fp32 matrix until the backward); with a
    #: teacher ensemble a loss that reads it is counted with its teacher half (half of these) once per teacher
    similarity_matrices: int = 0

    def forward(  # type: ignore[override]
        self, student: ClipOutput, teacher: ClipOutput | None, batch: Mapping[str, Any] | None = None
    ) -> dict[str, Tensor]:
        raise NotImplementedError


#: the separator of a loss term's name that makes it a breakdown, logged and not added to the objective
BREAKDOWN_SEPARATOR = "/"


def is_breakdown(term: str) -> bool:
    """Whether a loss term named ``term`` is a breakdown for the log (``affinity_i2t/teacher1``), not a summand."""
    return BREAKDOWN_SEPARATOR in term


@dataclass
class Calibration:
    """What the engine hands :meth:`Inheritance.prepare` before ``inherit`` on a fresh start of a stage.

    ``batches()``: the first :meth:`Inheritance.calibration_batches` micro-batches of the stage's own training data
    (``{"images", "texts", ...}``, prepared for the source model), drawn by a loader of their own when first called
    (never if not called): the run's data position and random states are as if they had not been drawn.
    ``scores_path``: the file the stage's run directory keeps the strategy's scores in (:class:`~compress.rundir.RunDir`
    ``importance_scores``). ``device``: where the source lives. ``main``: whether this process writes files (the
    engine calls ``prepare`` on rank 0 first, then on the others). A process with ``main=False`` never computes:
    it reads the file rank 0 wrote at ``scores_path``, strictly (missing, or of another key, is an error naming
    the path), so the run directory must be shared by all ranks. ``micro_batch``, ``world_size``: the samples of
    one of those micro-batches (per process) and the number of processes (what the batches are, beside their count:
    a scores file kept for another layout is not the same scores; 0: unknown).
    """

    batches: Callable[[], list[dict[str, Any]]]
    scores_path: Path
    device: Any
    main: bool = True
    micro_batch: int = 0
    world_size: int = 1


class Inheritance:
    """An inheritance plug-in: how a student gets its first weights from a source model.

    ``inherit(student, source)`` receives the freshly built (randomly initialised) student
    and the source (the teacher, or the previous stage's exported student) and returns the
    module to train. Strategies that learn their structure (masks) add a regulariser and
    parameter groups, and may make the model smaller during training (``on_step``).
    ``export(student)`` returns the physically smaller model that is saved and evaluated.

    A strategy describes itself to the engine through the members below (the engine reads nothing
    else of it): what its constructor needs from the engine (``context``), whether it prunes to a
    target and which parameter sets it (``target_parameter``, :meth:`pruning_target`), its text in
    ``--dry-run``'s plan (:meth:`describe_student`, :meth:`replacement_step`, :meth:`schedule_lines`),
    the learning rate after it replaced the student (:meth:`schedule_after_replacement`), and what it
    made of the student for a checkpoint (:meth:`record`, :meth:`restore`; NVIDIA ModelOpt's
    convert / restore).
    """

    #: False when the strategy does not need a student architecture (it derives it itself).
    needs_student_config: bool = True
    #: False when the strategy does not read the source model (training from scratch).
    needs_source: bool = True
    #: what decides a derived student's split of its size between towers, in the plan's text ("decided by ...")
    structure_decided_by: ClassVar[str] = "training"
    #: the towers a target is a fraction of (their prunable parameters: the tower without the token
    #: embedding); the row's ``sparsity/achieved`` counts the same towers
    towers: tuple[str, ...] = ("vision", "text")
    #: the values the engine supplies to the constructor (parameters of the same names): ``total_steps``
    #: (``train.steps``). A name the engine does not supply is refused when the config is read.
    context: ClassVar[tuple[str, ...]] = ()
    #: constructor parameters left out of the run id while they are at their default (as a loss's): parameters
    #: added after run ids were published, so that those ids stay (a value other than the default is in the id)
    identity_optional: ClassVar[tuple[str, ...]] = ()
    #: the constructor parameter that sets the fraction of its source's prunable parameters the strategy
    #: removes (None: it does not prune to a target). A staged run sets it to each stage's own share of the
    #: stage's cumulative ``target_sparsity`` (:mod:`compress.recipe.stages`).
    target_parameter: ClassVar[str | None] = None
    #: constructor parameters bound to one particular source model (a file computed from its weights, say):
    #: a stage whose source is the previous stage's student (a model that does not exist before the run) is refused
    #: with any of them set, when the config is read (:mod:`compress.recipe.stages`)
    source_bound: ClassVar[tuple[str, ...]] = ()
    #: whether what the strategy can remove from the teacher in one go bounds what a chain of its stages can: then
    #: the dry run also checks a stage sourced from the previous stage (whose shape it cannot know) by
    #: ``check(None, teacher)`` at the stage's cumulative target, so an unreachable target is refused before the
    #: first stage trains (an instance may set it from its parameters)
    bounded_by_teacher: bool = False
    #: after ``inherit``, the source layer of each student layer per tower (``{"vision": [0, 2, ...]}``), where
    #: the strategy maps layers; the structure report aligns the student with its source by it
    layer_map: dict[str, list[int]] | None = None

    def inherit(self, student: nn.Module | None, source: nn.Module) -> nn.Module:
        raise NotImplementedError

    def calibration_batches(self) -> int:
        """How many training micro-batches :meth:`prepare` may draw (the strategy's :meth:`schedule_lines` say
        what they cost); 0 by default."""
        return 0

    def prepare(self, calibration: Calibration, source: nn.Module) -> None:
        """Called before :meth:`inherit` on a fresh start of a stage (never on a resume, nor by the dry run), with
        the stage's source model: score it (on ``calibration.batches()``), or read the scores kept at
        ``calibration.scores_path``. The default does nothing."""

    def check(self, student: nn.Module | None, source: nn.Module) -> None:
        """Raise the error (a ``ValueError``) that :meth:`inherit` would raise for these architectures, changing
        nothing: the dry run calls it on shape-only models (PyTorch's ``meta`` device), so what the run would
        refuse a second after it starts is refused before. The default checks nothing."""

    def pruning_target(self) -> float | None:
        """The fraction of its source's prunable parameters this instance removes (None: no target). The
        default reads the attribute named by :attr:`target_parameter` (the constructor stores it so)."""
        return None if self.target_parameter is None else float(getattr(self, self.target_parameter))

    def describe_student(self, source: str) -> str:
        """The plan's student line of a strategy that derives the student from ``source`` (a text: "the
        teacher", "stage 0 (a)'s exported student"), for ``needs_student_config = False``."""
        return f"derived from {source} by inheritance {type(self).__name__}"

    def replacement_step(self) -> int | None:
        """The step at which :meth:`on_step` replaces the student, where it is known before training (the plan
        shows the learning rate there); None: no replacement, or not known in advance."""
        return None

    def schedule_lines(self, total_steps: int) -> list[str]:
        """The plan's lines on the strategy's own schedules and on what follows its replacement of the student
        (below the configured schedules); none by default."""
        return []

    def schedule_after_replacement(self, lr_schedule: Schedule, lr: float, step: int, total_steps: int) -> Schedule:
        """The learning-rate schedule once :meth:`on_step` replaced the student at ``step`` (the lr was ``lr``
        there; the trainer builds a new optimizer). Called again with the same values on resume, so it must
        depend on them alone. The default is TinyCLIP's policy after pruning, which the trainer applied to every
        strategy before strategies named their own: a cosine from ``lr`` at ``step`` to 0 at ``total_steps``, no
        new warm-up (:class:`CosineFrom`); return ``lr_schedule`` to let the configured schedule go on."""
        return CosineFrom(lr, step, total_steps)

    def record(self, student: nn.Module) -> dict[str, Any]:
        """What the strategy made of ``student`` that its weights and structure do not say (masks attached ...),
        as plain JSON values: the checkpoint stores it beside the student's structure and hands it back to
        :meth:`restore` on resume (ModelOpt's convert record). Its keys must not be the engine's (``model_cfg``,
        ``structure``, ``preprocess_cfg``, ``converted``). The default, the record of every checkpoint before
        strategies wrote their own: ``masked``, whether masks (:mod:`compress.masks`) are attached to the student,
        so that a resume rebuilds a masked one through :meth:`inherit` (see :meth:`restore`)."""
        from compress.masks import get_masks  # lazily: the contract is imported without the models

        return {"masked": get_masks(student) is not None}

    def restore(self, record: Mapping[str, Any], source: nn.Module | None) -> nn.Module | None:
        """The module whose state a checkpoint holds, rebuilt from its :meth:`record` (the whole student record
        of the checkpoint, the strategy's keys included) without weights yet (the engine loads them, strictly),
        or None: the engine rebuilds the student itself, through :meth:`inherit` as on a fresh start where the
        record says ``masked`` (the masks' modules are then the ones the weights were saved from), else as a plain
        student of the recorded structure. ``source``: the stage's source model. The default: None."""
        return None

    def regularizer(self, student: nn.Module, step: int) -> dict[str, Tensor]:
        """Extra loss terms added to the distillation loss (e.g. a sparsity Lagrangian)."""
        return {}

    def param_groups(self, student: nn.Module) -> list[dict[str, Any]]:
        """Optimizer groups for the strategy's own parameters (mask logits, multipliers)."""
        return []

    def owned_parameters(self, student: nn.Module) -> set[int]:
        """ids of parameters that belong to ``param_groups`` and not to the weight groups."""
        return {id(p) for group in self.param_groups(student) for p in group["params"]}

    def on_step(self, student: nn.Module, step: int) -> nn.Module | None:
        """Called after every optimizer step; return a new module to replace the student
        (the trainer then rebuilds its optimizer), or None to go on unchanged."""
        return None

    def replaces_at(self, student: nn.Module, step: int) -> bool:
        """Whether :meth:`on_step` may return a replacement at ``step``. The trainer then learns whether the
        step was taken before calling it (a skipped step is not followed by ``on_step``), even where it reads
        that outcome one step late (the finite check decided on the device); True is always safe, only slower."""
        return False

    def log_values(self, student: nn.Module) -> dict[str, float]:
        return {}

    def export(self, student: nn.Module) -> nn.Module:
        return student

    def state_dict(self) -> dict[str, Any]:
        """The strategy's own state a resumed run needs (its step, sizes); plain numbers only.
        Masks and multipliers are modules of the student and are saved with its weights."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (called on resume, after ``inherit`` or instead of it once
        the student was made smaller)."""


class Schedule:
    """A schedule plug-in: ``value(step) -> float`` (learning rate, target sparsity, weights).

    The engine offers context to the constructor (``base_value``, ``total_steps``); a
    schedule declares the ones it uses as parameters. Config keys: ``schedules.lr`` and
    ``schedules.weight/<loss>`` (see :mod:`strategies.schedules`).
    """

    def value(self, step: int) -> float:
        raise NotImplementedError

    def __call__(self, step: int) -> float:
        return self.value(step)


class CosineFrom(Schedule):
    """Cosine decay from ``start_value`` at ``start_step`` to 0 at ``total_steps`` (no warm-up): the lr after a
    strategy replaced the student (TinyCLIP continues this way after pruning), the default of
    :meth:`Inheritance.schedule_after_replacement`. Not a config key."""

    def __init__(self, start_value: float, start_step: int, total_steps: int) -> None:
        self.start_value, self.start_step = start_value, start_step
        self.span = max(total_steps - start_step, 1)

    def value(self, step: int) -> float:
        progress = min(max((step - self.start_step) / self.span, 0.0), 1.0)
        return self.start_value * 0.5 * (1.0 + math.cos(math.pi * progress))
