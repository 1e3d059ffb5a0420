"""The distillation loop: student vs frozen teacher, loss plug-ins, schedules, checkpoints.

One process, or data-parallel over a torch.distributed group (:mod:`compress.distributed`):
the student's live forward (:class:`LiveForward`) is wrapped in ``DistributedDataParallel``
(the frozen teacher is not); every loss compares its local rows against the columns of all
ranks, gathered with gradients, so N processes with B samples each take the same step as one
process with N·B. Each rank reads its own share of the data (the stream is passed in); the
objective and its terms are averaged over ranks, so the finite check, the log and the gradient
scaler agree everywhere; learnable masks draw one gate sample per step from a generator seeded
with the run seed and the step, the same on every rank. The teacher's outputs come through one
callable (:mod:`compress.teacher`) that a cache can replace.

A step takes ``accum_steps`` micro-batches from the stream (the loader's batch is the
micro-batch, ``batch_size / (world size x accum_steps)``), drawn one at a time and moved to the
device one at a time; the live pass reads them a second time from a second stream (``replay``, see
:class:`StepInputs`) or, without one, from the first pass's, kept on the host. Accumulation is the gradient cache
(Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"),
which keeps distillation exact: (1) the student's outputs (normalised features, and the
embeddings a loss asks for) of every micro-batch without graph (its random state kept, so that
the live pass replays the same dropout), BatchNorm normalising with the
micro-batch's statistics without updating its running ones, and the teacher's outputs, once;
(2) the loss terms over the whole step's batch, once (one set of B x B similarities and
gathers), on leaf copies of those outputs, with the student's logit scale and the strategy's
regulariser, in one backward: the outputs' gradients, and directly the gradients of the logit
scale, of the parameters a loss owns (a projector) and of the strategy's (masks, multipliers);
(3) for each micro-batch j a live forward with graph and ``backward(outputs_j, gradients_j)``,
which sums to the full-batch gradient of the towers. Without accumulation (one micro-batch),
step (1) is the live forward itself. With several processes, the live passes run under DDP's
``no_sync`` but the last, which all-reduces once per step; DDP holds only the towers' weights,
all used by every live pass (``find_unused_parameters=False``, no graph walk; those of a layer pruned to
no heads or neurons, which no pass reads, are left out), and broadcasts
no buffers per forward (they are constants or SyncBatchNorm statistics, updated alike on every
rank); the gradients of the parameters outside the live forward (logit scale, the losses' and
the strategy's) are averaged over ranks in one all-reduce.

Every optimizer step is guarded: the objective (loss terms and regulariser) and the
gradients of every trained parameter must be finite, otherwise the step is skipped (with
fp16, the gradient scaler backs off). On CUDA the skip is decided on the device (the fused AdamW's
``found_inf``) and the flag read one step later, so the check does not drain the GPU queue every
step (:attr:`Trainer.defer_finite_check`). Loss terms whose current weight is 0 are not computed.
After each step the student's ``logit_scale`` is clamped to [0, ln 100] (CLIP, open_clip).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from compress import distributed
from compress.config import TrainConfig
from compress.live_forward import FEATURES, TOWERS, LiveForward, compile_towers
from compress.masks import one_gate_sample
from compress.models.towers import unused_parameters
from compress.optim import build_adamw, grad_norm, weight_groups
from compress.outputs import ClipOutput
from compress.plugins import BREAKDOWN_SEPARATOR, DistillLoss, Inheritance, Schedule, is_breakdown
from compress.precision import Precision, to_device
from compress.progress import progress
from compress.rundir import METRICS_FILE
from compress.step_inputs import Replay, StepInputs, split_batch, step_batch
from compress.step_random import frozen_batch_norm_statistics, gate_generator, random_state, replayed_random_state
from compress.step_result import DeviceFlag, StepResult
from compress.step_timer import StepTimer
from compress.stopping import StoppedAtStep
from compress.teacher import TeacherSource
from compress.training_error import TrainingError

logger = logging.getLogger(__name__)


#: the student's logit scale ln(1/tau) is clamped to [0, ln 100] after every step (CLIP, open_clip, TinyCLIP)
LOGIT_SCALE_MAX = math.log(100.0)


@dataclass
class LossTerm:
    """A configured loss plug-in and the weight its terms are multiplied by; with a ``schedule``
    (``schedules: {weight/NAME: ...}``) the weight at step t is ``schedule(t)``."""

    name: str
    weight: float
    module: DistillLoss
    schedule: Schedule | None = None

    def weight_at(self, step: int) -> float:
        return float(self.schedule(step)) if self.schedule is not None else self.weight

    def ever_active(self, steps: int) -> bool:
        """Whether the term has a weight other than 0 at some step of a run of ``steps`` steps (a term that never
        has, MobileCLIP's lambda = 0 throughout, needs nothing: not even a teacher on the device)."""
        if self.schedule is None:
            return self.weight != 0.0
        return any(self.weight_at(step) != 0.0 for step in range(steps + 1))


def loss_labels(losses: list[LossTerm]) -> list[str]:
    """Each term's name, or its index where two terms share a name (as in ``weight/<label>``)."""
    names = [t.name for t in losses]
    return [name if names.count(name) == 1 else str(i) for i, name in enumerate(names)]


@dataclass
class TrainSummary:
    steps: int
    final_terms: dict[str, float]
    nonfinite_steps: int
    samples_per_s: float
    duration_s: float
    replaced_at: list[int] = field(default_factory=list)


def mean_over_ranks(loss: Tensor, terms: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """The objective and its terms averaged over ranks (each rank's loss is over its own rows against
    all ranks' columns: the mean is the loss of the global batch); unchanged on one process."""
    if distributed.world_size() == 1:
        return loss, terms
    local = torch.stack([loss.detach().float(), *(v.detach().float() for v in terms.values())])
    values = distributed.mean_over_ranks(local)
    return values[0], dict(zip(terms, values[1:], strict=True))


class Trainer:
    """Trains ``student`` for ``cfg.steps`` optimizer steps; see the module docstring."""

    #: decide a non-finite step's skip on the device (fused AdamW / GradScaler with a ``found_inf`` tensor)
    #: and read the flag on the host one step later, or at a log or checkpoint step, instead of a host sync
    #: per step. ``None``: on CUDA (where a sync drains the GPU queue); ``True`` forces it (tests, on CPU).
    defer_finite_check: bool | None = None
    #: ``torch.compile``'s backend for ``train.compile`` (tests use ``aot_eager``: inductor's C++ build of a
    #: CPU graph takes minutes on a small machine)
    compile_backend: str = "inductor"

    def __init__(
        self,
        cfg: TrainConfig,
        student: nn.Module,
        losses: list[LossTerm],
        lr_schedule: Schedule,
        batches: Iterator[Mapping[str, Any]],
        precision: Precision,
        teacher: TeacherSource | None = None,
        inheritance: Inheritance | None = None,
        run_dir: Path | None = None,
        on_log: Any = None,
        on_checkpoint: Callable[[Trainer], None] | None = None,
        seed: int = 0,
        should_stop: Callable[[bool], int] | None = None,
        replay: Replay | None = None,
    ) -> None:
        self.cfg = cfg
        self.student = student
        self.losses = losses
        self.lr_schedule = lr_schedule
        #: the configured schedule, and (lr, step) of the last replacement of the student (its schedule after it)
        self.configured_lr = lr_schedule
        self.replaced_lr: tuple[float, int] | None = None
        self.batches = batches
        #: the stream's micro-batches a second time, for the live pass (None: the first pass's are kept)
        self.replay = replay
        self.precision = precision
        self.device = precision.device
        self.teacher = teacher
        self.inheritance = inheritance or Inheritance()
        self.run_dir = run_dir
        self.on_checkpoint = on_checkpoint
        self.on_log = on_log
        self.seed = seed
        #: asked after every step (is it the last?): a signal number (every rank the same) stops training there,
        #: after a checkpoint
        self.should_stop = should_stop
        self.needs = tuple(sorted({n for term in losses for n in term.module.needs}))
        self.uses_teacher = any(term.module.needs_teacher and term.ever_active(cfg.steps) for term in losses)
        if self.uses_teacher and teacher is None:
            raise TrainingError("a configured loss needs a teacher, but there is none")
        self.labels = loss_labels(losses)
        self.scaler = precision.grad_scaler()
        #: the next optimizer step to run (``cfg.steps`` once training is over)
        self.step = 0
        self.nonfinite = self.in_a_row = self.samples = 0
        self.elapsed_s = 0.0
        self.replaced_at: list[int] = []
        self.last_terms: dict[str, float] = {}
        #: (step, result, samples) of steps whose outcome is not counted yet (see :meth:`_settle`)
        self._pending: list[tuple[int, StepResult, int]] = []
        #: where the steps' time goes, in the logged record (:mod:`compress.step_timer`; no per-step device sync)
        self.timer = StepTimer(self.device)
        self._apply_grad_checkpointing()
        self._apply_compile()
        self.optimizer = self._build_optimizer()
        self._wrap()

    # -- setup --------------------------------------------------------------------------
    def _apply_grad_checkpointing(self) -> None:
        """``train.grad_checkpointing``: recompute the towers' activations in backward (open_clip's
        ``set_grad_checkpointing``), on the student and on any student a strategy swaps in."""
        if not self.cfg.grad_checkpointing:
            return
        if not hasattr(self.student, "set_grad_checkpointing"):
            raise TrainingError(
                f"train.grad_checkpointing: the student ({type(self.student).__name__}) has no "
                "set_grad_checkpointing; set it to false"
            )
        self.student.set_grad_checkpointing(True)

    def _apply_compile(self) -> None:
        """``train.compile``: ``torch.compile`` the student's towers (:func:`compile_towers`), on the student
        and on the smaller student a strategy swaps in. A student that carries learnable masks (auto
        inheritance before its prune step) runs eagerly, and is compiled once it is pruned: the gates change
        every step and are written into the modules by hooks, which compiled graphs would recompile for."""
        if not self.cfg.compile:
            return
        from compress.masks import get_masks

        if get_masks(self.student) is not None:
            logger.warning("train.compile: the student carries learnable masks; it runs eagerly until it is "
                           "pruned, and is compiled then")
            return
        compile_towers(self.student, self.compile_backend)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        own = self.inheritance.param_groups(self.student)
        skip = {id(p) for g in own for p in g["params"]}
        modules = [("", self.student)] + [(f"loss.{t.name}", t.module) for t in self.losses]
        groups = weight_groups(modules, self.cfg.weight_decay, skip) + own
        fused = self.device.type == "cuda" or self.defer_finite_check is True  # fused AdamW handles maximize too
        return build_adamw(groups, self.cfg.lr, tuple(self.cfg.betas), self.cfg.eps, fused=fused)

    def _wrap(self) -> None:
        """``self.model``: the student's live forward (:class:`LiveForward`), in ``DistributedDataParallel``
        when there are several ranks. DDP holds the towers' weights, every one of which each live pass
        uses (``find_unused_parameters=False``: no graph walk per step); the trained parameters outside
        the live forward (the logit scale, the losses' projectors, a strategy's masks and multipliers,
        ``self._outside``) are left out of DDP, broadcast from rank 0 here and their gradients averaged
        over ranks once per step (:meth:`_reduce_outside`); so are the parameters no live pass reads
        (:func:`~compress.models.towers.unused_parameters`: a layer pruned to no heads or no neurons).
        Buffers are not broadcast in every forward (``broadcast_buffers=False``): the student's buffers are
        constants (attention masks, mask indices) or SyncBatchNorm statistics, which every rank updates with
        the same global statistics."""
        self._outside: list[nn.Parameter] = []
        if distributed.world_size() > 1:
            self._sync_batch_norm()
        self.live = LiveForward(self.student, self.needs)
        self.model: nn.Module = self.live
        if distributed.world_size() == 1:
            return
        from torch.nn.parallel import DistributedDataParallel

        trained = {id(p) for p in self.trained_parameters()}
        scale = getattr(self.student, "logit_scale", None)
        outside = self.inheritance.owned_parameters(self.student)
        if isinstance(scale, Tensor):
            outside.add(id(scale))
        # parameters no live pass reads (a layer pruned to no heads or neurons): DDP would wait for their
        # gradients forever; they get none, those with values are broadcast and reduced with the others outside
        outside |= {id(p) for p in unused_parameters(self.student)}
        ignored = [name for name, p in self.live.named_parameters() if id(p) in outside or id(p) not in trained]
        in_student = {id(p) for p in self.student.parameters()}
        self._outside = [p for p in self.trained_parameters()
                         if (id(p) in outside or id(p) not in in_student) and p.numel()]
        distributed.broadcast_from_main([p.data for p in self._outside])
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.live, ignored)
        # no buffer sync in every forward: ``forward_sync_buffers`` where torch has it (``broadcast_buffers``,
        # its older name, warns there); the weights and buffers are the same on every rank from the start
        newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        sync = "forward_sync_buffers" if newer else "broadcast_buffers"
        self.model = DistributedDataParallel(self.live, find_unused_parameters=False, **{sync: False})

    def _reduce_outside(self) -> None:
        """Average over ranks the gradients DDP does not hold (``self._outside``), in one all-reduce:
        each rank's loss over its rows gives its share, the mean is the whole batch's gradient."""
        grads = [p.grad for p in self._outside if p.grad is not None]
        if not grads:
            return
        flat = distributed.mean_over_ranks(torch.cat([g.reshape(-1) for g in grads]))
        for g, value in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(value.view_as(g))

    def _sync_batch_norm(self) -> None:
        """BatchNorm layers of the student (ResNet towers) normalise over the global batch: converted to
        ``SyncBatchNorm`` on GPUs (same parameters and buffers); refused on CPU, where torch has none."""
        norms = [m for m in self.student.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms or all(isinstance(m, nn.SyncBatchNorm) for m in norms):
            return
        if self.device.type != "cuda":
            raise TrainingError(
                f"the student has {len(norms)} BatchNorm layer(s) (a ResNet tower): with {distributed.world_size()} "
                "processes on CPU their batch statistics cannot be synchronised (torch's SyncBatchNorm needs GPUs), "
                "so the processes would not train as one: use one process, or GPUs"
            )
        self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)

    def _no_sync(self) -> contextlib.AbstractContextManager:
        no_sync = getattr(self.model, "no_sync", None)
        return no_sync() if no_sync is not None else contextlib.nullcontext()

    def trained_parameters(self) -> list[nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _set_lr(self, step: int) -> float:
        lr = self.lr_schedule(step)
        for group in self.optimizer.param_groups:
            if group.get("follows_schedule"):
                group["lr"] = lr
        return lr

    # -- one step -----------------------------------------------------------------------
    def _loss(
        self,
        student_out: ClipOutput,
        teacher_out: ClipOutput | None,
        batch: Mapping[str, Any],
        weights: list[float],
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """sum_k w_k * term_k over the loss plug-ins whose weight w is not 0 (the others are not run); a breakdown
        term (``name/part``: :func:`compress.plugins.is_breakdown`) is logged, not added."""
        terms: dict[str, Tensor] = {}
        total = student_out.image_features.new_zeros((), dtype=torch.float32)
        for term, weight in zip(self.losses, weights, strict=True):
            if weight == 0.0:
                continue
            for key, value in term.module(student_out, teacher_out, batch).items():
                name = key if key not in terms else f"{term.name}.{key}"
                terms[name] = value
                if not is_breakdown(key):
                    total = total + weight * value.float()
                elif value.requires_grad:  # a summand named like a breakdown would silently not be learnt from
                    raise TrainingError(
                        f"loss {term.name!r} returned the term {key!r} with a gradient: a name with "
                        f"{BREAKDOWN_SEPARATOR!r} marks a breakdown, logged and not added; compute it without "
                        "graph (torch.no_grad) or rename it"
                    )
        return total, terms

    def _backward(self, loss: Tensor) -> None:
        if not loss.requires_grad:
            return  # no active loss term and no regulariser this step: nothing to learn from
        scaled = self.scaler.scale(loss) if self.scaler is not None else loss
        scaled.backward()

    def _forward_backward(
        self, batch: Mapping[str, Any] | Sequence[Mapping[str, Any]] | StepInputs, step: int,
        weights: list[float] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Forward and backward of one optimizer step: ``batch`` is the step's ``accum_steps``
        micro-batches (as :meth:`fit` draws them, or a list), or one collated batch, split here into
        views. Returns (objective, terms), the objective being the weighted loss terms plus the
        strategy's regulariser."""
        weights = [t.weight_at(step) for t in self.losses] if weights is None else weights
        if not isinstance(batch, StepInputs):
            batch = StepInputs.of(split_batch(batch, self.cfg.accum_steps) if isinstance(batch, Mapping) else batch)
        if batch.count != self.cfg.accum_steps:
            raise TrainingError(f"a step takes train.accum_steps = {self.cfg.accum_steps} micro-batches, "
                                f"got {batch.count}")
        with one_gate_sample(self.student, gate_generator(self.seed, step, self.device)):
            return self._accumulate(batch, step, weights)

    def _accumulate(self, inputs: StepInputs, step: int, weights: list[float]) -> tuple[Tensor, dict[str, Tensor]]:
        """The gradient cache (Gao et al. 2021): (1) the student's outputs of every micro-batch without
        graph (a single micro-batch: its live pass, with graph) and the teacher's, one micro-batch on the
        device at a time; (2) the loss over the whole step's batch once, on leaf copies of those outputs,
        plus the regulariser, one (scaled) backward: the outputs' gradients, and the gradients of the
        logit scale, the losses' and the strategy's parameters; (3) per micro-batch a live forward and
        ``backward(outputs, output gradients)``, all but the last under DDP's ``no_sync``; (4) the
        gradients DDP does not hold averaged over ranks."""
        active = [t for t, w in zip(self.losses, weights, strict=True) if w != 0.0]
        regular = self.inheritance.regularizer(self.student, step) if not active else None
        if regular is not None:  # no active loss term: the regulariser alone (no data, the same on every rank)
            inputs.skip()  # the step's micro-batches are drawn all the same: the data position moves
            total = sum(regular.values(), torch.zeros((), device=self.device))
            self._backward(total)
            self._reduce_outside()
            return total.detach(), regular
        uses_teacher = any(t.module.needs_teacher for t in active)
        teacher_parts, parts, states = [], [], []
        live: tuple[Tensor | None, ...] | None = None
        if inputs.count == 1:  # no accumulation: the live pass is the only pass
            for m in inputs.first():
                on_device = to_device(m, self.device)
                if uses_teacher:
                    with self.timer.device("teacher"):
                        teacher_parts.append(self.teacher(on_device))
                with self.timer.device("student"), self.precision.autocast():
                    live = self.model(on_device["images"], on_device["texts"])
                parts.append(live)
        else:
            with torch.no_grad(), frozen_batch_norm_statistics(self.student):
                for m in inputs.first():
                    on_device = to_device(m, self.device)
                    if uses_teacher:
                        with self.timer.device("teacher"):
                            teacher_parts.append(self.teacher(on_device))
                    states.append(random_state(self.device))
                    with self.timer.device("student"), self.precision.autocast():
                        parts.append(self.live(on_device["images"], on_device["texts"]))
                del m, on_device  # only the outputs stay; the live pass reads the micro-batches again
        leaves = {
            name: (torch.cat([p[i] for p in parts]) if len(parts) > 1 else parts[0][i]).detach().requires_grad_()
            for i, name in enumerate(FEATURES) if parts[0][i] is not None
        }
        with self.timer.device("loss"):
            with self.precision.autocast():
                student_out = ClipOutput(logit_scale=self.student.logit_scale.exp(), **leaves)
                teacher_out = ClipOutput.cat(teacher_parts) if teacher_parts else None
                loss, terms = self._loss(student_out, teacher_out, step_batch(inputs.meta, self.device), weights)
            regular = self.inheritance.regularizer(self.student, step)
            objective = loss + sum(regular.values(), loss.new_zeros(()))
            self._backward(objective)
        grads = {name: leaf.grad.split(inputs.sizes) for name, leaf in leaves.items() if leaf.grad is not None}
        if self.model is not self.live and not all({f"{t}_features", f"{t}_embeds"} & grads.keys() for t in TOWERS):
            raise TrainingError(
                f"with {distributed.world_size()} processes every tower must take part in the loss (DDP expects "
                f"a gradient for all its weights), but the active loss terms read only {sorted(grads)}"
            )
        if grads:
            for j, m in enumerate(inputs.again() if live is None else [None]):
                last = j == inputs.count - 1
                with contextlib.nullcontext() if last else self._no_sync(), self.timer.device("student"):
                    if live is None:  # the features pass's random draws (dropout) again: the same outputs
                        on_device = to_device(m, self.device)
                        with replayed_random_state(states[j], self.device), self.precision.autocast():
                            live = self.model(on_device["images"], on_device["texts"])
                    names = [name for name in FEATURES if name in grads]
                    torch.autograd.backward([live[FEATURES.index(n)] for n in names], [grads[n][j] for n in names])
                    live = None
        elif inputs.replay is not None:  # no output has a gradient: no live pass, but the second stream moves on
            for _ in inputs.again():
                pass
        self._reduce_outside()
        return objective.detach(), {**terms, **regular}

    def _optimizer_step(self, loss: Tensor) -> tuple[bool, bool, Tensor | None]:
        """Clip, check and step; returns (stepped, non-finite, the weights' gradient norm before clipping).

        The step is skipped when the objective or any trained parameter's gradient is not finite;
        with a gradient scaler the scale then backs off (``GradScaler.update``)."""
        params = self.trained_parameters()
        if not any(p.grad is not None for p in params):
            return False, not bool(torch.isfinite(loss)), None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        weights = [p for g in self.optimizer.param_groups if g.get("follows_schedule") for p in g["params"]]
        others = [p for g in self.optimizer.param_groups if not g.get("follows_schedule") for p in g["params"]]
        if self.cfg.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(weights, self.cfg.grad_clip)
        else:
            norm = grad_norm(weights)
        rest = grad_norm(others).to(norm.device)
        if self._defers():
            finite = torch.isfinite(loss.to(norm.device)) & torch.isfinite(norm) & torch.isfinite(rest)
            return False, self._device_step(finite), norm
        checks = torch.stack([torch.isfinite(loss.to(norm.device)), torch.isfinite(norm), torch.isfinite(rest)])
        loss_finite, norm_finite, rest_finite = checks.tolist()
        grads_finite = norm_finite and rest_finite
        stepped = loss_finite and grads_finite
        if self.scaler is not None:
            if stepped:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            elif not grads_finite:
                self.scaler.update()  # the unscale recorded the inf: backs off, resets its growth count
            else:  # a non-finite objective with finite gradients: back off all the same
                self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
        elif stepped:
            self.optimizer.step()
        if stepped:
            self._clamp_logit_scale()
        return stepped, not stepped, norm

    def _defers(self) -> bool:
        """Whether the finite check is decided on the device (:attr:`defer_finite_check`); it needs the
        fused AdamW, whose kernel skips the whole update (moments and step count too) when told to."""
        wanted = self.device.type == "cuda" if self.defer_finite_check is None else self.defer_finite_check
        return bool(wanted) and bool(self.optimizer.defaults.get("fused"))

    def _device_step(self, finite: Tensor) -> DeviceFlag:
        """The optimizer step, skipped on the device where ``finite`` is false; no host sync.

        ``found_inf`` (1.0 = skip) is what torch's fused optimizers read (the protocol GradScaler uses);
        with a scaler it is merged into the scaler's own inf flags, so the step is skipped and the scale
        backs off (growth count reset) in one ``update``. The logit-scale clamp is run either way (a
        skipped step left the scale as the last clamp did)."""
        found_inf = (~finite).to(torch.float32)
        if self.scaler is not None:
            state = self.scaler._per_optimizer_states[id(self.optimizer)]
            for flag in state["found_inf_per_device"].values():
                flag.copy_(torch.maximum(flag, found_inf.to(flag.device)))
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.grad_scale, self.optimizer.found_inf = None, found_inf
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.grad_scale, self.optimizer.found_inf
        self._clamp_logit_scale()
        return DeviceFlag(~finite)

    @torch.no_grad()
    def _clamp_logit_scale(self) -> None:
        scale = getattr(self.student, "logit_scale", None)
        if isinstance(scale, Tensor):
            scale.clamp_(0.0, LOGIT_SCALE_MAX)

    def train_step(self, batch: Mapping[str, Any] | Sequence[Mapping[str, Any]] | StepInputs, step: int
                   ) -> StepResult:
        """Forward, backward and (if everything is finite) one optimizer step on ``batch`` (the step's
        micro-batches, or one collated batch)."""
        weights = [t.weight_at(step) for t in self.losses]
        loss, terms = mean_over_ranks(*self._forward_backward(batch, step, weights))
        with self.timer.device("optimizer"):
            stepped, nonfinite, norm = self._optimizer_step(loss)
            self.optimizer.zero_grad(set_to_none=True)
        self.timer.end_step()
        return StepResult(stepped, nonfinite, loss, terms, weights, norm)

    def _settle(self, keep: int = 0) -> int:
        """Count the outcome of the pending steps but the newest ``keep`` (skipped: counted, and training
        aborts after ``max_nonfinite_in_row``; taken: its samples); returns the samples of taken steps."""
        taken = 0
        while len(self._pending) > keep:
            step, result, samples = self._pending.pop(0)
            if result.nonfinite:
                self.nonfinite += 1
                self.in_a_row += 1
                if self.in_a_row >= self.cfg.max_nonfinite_in_row:
                    self._pending.clear()
                    raise TrainingError(
                        f"the loss or its gradients were not finite for {self.in_a_row} steps in a row (last at "
                        f"step {step}); lower the learning rate, use bf16 instead of fp16, or check the data"
                    )
            else:
                self.in_a_row = 0
                self.samples += samples
                taken += samples
        return taken

    def _draw_micro_batch(self) -> Mapping[str, Any]:
        """The next batch of the stream, one micro-batch of this rank (``batch_size / (world size x
        accum_steps)`` samples), left where the loader put it."""
        size = self.cfg.micro_batch(distributed.world_size())
        with self.timer.host("data_wait"):
            m = next(self.batches)
        if len(m["images"]) != size:
            raise TrainingError(
                f"the data stream gave a batch of {len(m['images'])} samples; a step takes "
                f"{self.cfg.accum_steps} micro-batches of train.batch_size {self.cfg.batch_size} / "
                f"({distributed.world_size()} process(es) x {self.cfg.accum_steps}) = {size}"
            )
        return m

    # -- loop ---------------------------------------------------------------------------
    def fit(self) -> TrainSummary:
        """Train from ``self.step`` (0, or the step a resumed checkpoint reached) to ``cfg.steps``."""
        cfg = self.cfg
        main = distributed.is_main_process()
        bar = progress(cfg.steps, "train", enabled=cfg.progress and main)
        if self.step:  # resumed: the bar starts where the checkpoint was
            bar.update(self.step)
        start = window_start = time.perf_counter()
        elapsed_before = self.elapsed_s
        window_samples = 0
        self.student.train()
        for step in range(self.step, cfg.steps):
            lr = self._set_lr(step)
            # drawn as the step goes, one micro-batch at a time (each checked to be the micro-batch size)
            micro = StepInputs(self._draw_micro_batch, cfg.accum_steps, self.timer.replay(self.replay))
            result = self.train_step(micro, step)
            batch_size = sum(micro.sizes) * distributed.world_size()  # samples of all ranks
            total, terms = result.loss, result.terms
            is_last = step + 1 == cfg.steps
            is_log = (step + 1) % cfg.log_every == 0 or is_last or step == 0
            checkpoint_now = is_last or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0)
            # a flag decided on the device is read one step later (or now, at a log or checkpoint step, or
            # before the strategy may replace the student: a skipped step must not prune, as on the host path)
            self._pending.append((step, result, batch_size))
            replaces = self.inheritance.replaces_at(self.student, step + 1)
            window_samples += self._settle(keep=0 if result.known or is_log or checkpoint_now or replaces else 1)
            # not known to be skipped: taken, or (deferred) not read yet; a skipped step changed nothing,
            # so the strategy then sees the last taken step's state (auto inheritance: its clamp is a no-op)
            if not (result.known and result.nonfinite):
                replacement = self.inheritance.on_step(self.student, step + 1)
                if replacement is not None:
                    self._replace_student(replacement, step + 1, lr)
                    self.replaced_at.append(step + 1)
                if is_log and not result.nonfinite:  # known: settled above
                    now = time.perf_counter()
                    rate = window_samples / max(now - window_start, 1e-9)
                    window_start, window_samples = now, 0
                    self.last_terms = {k: float(v.detach()) for k, v in terms.items()}
                    self._log(self._record(step + 1, lr, result, rate))
                    bar.set_postfix(loss=f"{float(total):.4f}", sps=f"{rate:.0f}")
            self.step = step + 1
            self.elapsed_s = elapsed_before + time.perf_counter() - start
            # a signal (see compress.stopping); the last step's flag is read at once, not one step later
            stop = self.should_stop(is_last) if self.should_stop is not None else 0
            if stop or is_last or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0):
                self.save_checkpoint()
            if stop:
                bar.close()
                raise StoppedAtStep(stop, self.step)
            bar.update(1)
        bar.close()
        self.student.eval()
        return TrainSummary(
            steps=cfg.steps,
            final_terms=self.last_terms,
            nonfinite_steps=self.nonfinite,
            samples_per_s=self.samples / max(self.elapsed_s, 1e-9),
            duration_s=self.elapsed_s,
            replaced_at=self.replaced_at,
        )

    def _record(self, step: int, lr: float, result: StepResult, rate: float) -> dict[str, Any]:
        """One line of ``metrics.jsonl``: step, lr, objective, terms, scheduled weights, strategy values, and where
        the steps since the last line spent their time (``time/...``, :class:`~compress.step_timer.StepTimer`)."""
        record = {"step": step, "lr": lr, "loss": float(result.loss), "samples_per_s": rate}
        if result.grad_norm is not None:
            record["grad_norm"] = float(result.grad_norm)
        record.update({f"loss/{k}": v for k, v in self.last_terms.items()})
        for label, term, weight in zip(self.labels, self.losses, result.weights, strict=True):
            if term.schedule is not None:
                record[f"weight/{label}"] = weight
        record.update({f"inherit/{k}": v for k, v in self.inheritance.log_values(self.student).items()})
        record["nonfinite_steps"] = self.nonfinite
        record.update(self.timer.read(rate, distributed.world_size()))
        return record

    def _replace_student(self, student: nn.Module, step: int, lr: float) -> None:
        """A strategy replaced the student (made it smaller): a new optimizer, and the lr schedule the strategy
        names for what follows (:meth:`compress.plugins.Inheritance.schedule_after_replacement`)."""
        self.student = student.to(self.device).train()
        self._apply_grad_checkpointing()
        self._apply_compile()
        self.optimizer = self._build_optimizer()
        self._wrap()
        self._follow_replacement(lr, step)

    def _follow_replacement(self, lr: float, step: int) -> None:
        """The lr schedule after the replacement at ``step`` (lr ``lr`` there), as the strategy names it."""
        self.replaced_lr = (float(lr), int(step))
        self.lr_schedule = self.inheritance.schedule_after_replacement(self.configured_lr, float(lr), int(step),
                                                                       self.cfg.steps)

    def _log(self, record: dict[str, Any]) -> None:
        if not distributed.is_main_process():
            return
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.on_log is not None:
            self.on_log(record)

    def save_checkpoint(self) -> None:
        """Hand the trainer to ``on_checkpoint`` on every rank (the run gathers each rank's data position
        and random states; rank 0 writes)."""
        self._settle()  # the counters it saves include every step run
        if self.on_checkpoint is not None:
            self.on_checkpoint(self)

    # -- resume -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What the next step depends on besides the student's weights, the data position and the
        random states: optimizer, scaler, the lr schedule after a swap, counters, loss modules
        (projectors) and the strategy's own state. Plain tensors and numbers (``weights_only``)."""
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "replaced_lr": list(self.replaced_lr) if self.replaced_lr is not None else None,
            "nonfinite": self.nonfinite,
            "in_a_row": self.in_a_row,
            "samples": self.samples,
            "elapsed_s": self.elapsed_s,
            "replaced_at": list(self.replaced_at),
            "last_terms": dict(self.last_terms),
            "losses": [term.module.state_dict() for term in self.losses],
            "inheritance": self.inheritance.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict` (the student must already hold the checkpoint's weights)."""
        for term, module_state in zip(self.losses, state["losses"], strict=True):
            term.module.load_state_dict(module_state)
        self.inheritance.load_state_dict(state["inheritance"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        replaced = state.get("replaced_lr", state.get("cosine_from"))  # its name in checkpoints before issue 17
        if replaced is not None:
            lr, step = replaced
            self._follow_replacement(float(lr), int(step))
        self.step = int(state["step"])
        self.nonfinite, self.in_a_row = int(state["nonfinite"]), int(state["in_a_row"])
        self.samples, self.elapsed_s = int(state["samples"]), float(state["elapsed_s"])
        self.replaced_at = [int(s) for s in state["replaced_at"]]
        self.last_terms = {k: float(v) for k, v in state["last_terms"].items()}
