"""The distillation loop: student vs frozen teacher, loss plug-ins, schedules, checkpoints.

One process, or data-parallel over a torch.distributed group (:mod:`compress.distributed`):
the student and the losses' own modules (projectors) are one :class:`StudentObjective`,
wrapped in ``DistributedDataParallel`` (the frozen teacher is not); every loss compares its
local rows against the columns of all ranks, gathered with gradients, so N processes with
B samples each take the same step as one process with N·B. Each rank reads its own share of
the data (the stream is passed in); the objective and its terms are averaged over ranks, so
the finite check, the log and the gradient scaler agree everywhere; learnable masks draw one
gate sample per step from a generator seeded with the run seed and the step, the same on
every rank. The teacher's outputs come through one callable (:mod:`compress.teacher`) that a
cache can replace.

Gradient accumulation follows open_clip's scheme so that distillation stays exact: the
student's features for every micro-batch are first computed without gradient; then, for
each micro-batch j, its features are recomputed with gradient and the loss is evaluated
over the whole accumulated batch (the other micro-batches' features held constant), so the
summed gradients equal the full-batch gradient. What the whole accumulated batch feeds
directly is counted once: the student's logit scale and a strategy's regulariser take part
in the first micro-batch's backward only, and the parameters a loss owns (a projector) get
their gradient from the first micro-batch's backward only (later backwards accumulate into
the other parameters alone). Learnable masks draw one gate sample per optimizer step, used
by every pass of that step. With several processes, the passes of micro-batches 1.. run under
DDP's ``no_sync`` and micro-batch 0's full backward comes last: it all-reduces the summed
gradients once per step.

Every optimizer step is guarded: the objective (loss terms and regulariser) and the
gradients of every trained parameter must be finite, otherwise the step is skipped (with
fp16, the gradient scaler backs off). On CUDA the skip is decided on the device (the fused AdamW's
``found_inf``) and the flag read one step later, so the check does not drain the GPU queue every
step (:attr:`Trainer.defer_finite_check`). Loss terms whose current weight is 0 are not computed.
After each step the student's ``logit_scale`` is clamped to [0, ln 100] (CLIP, open_clip).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from compress import distributed
from compress.config import TrainConfig
from compress.masks import one_gate_sample
from compress.models.forward import clip_forward
from compress.optim import build_adamw, grad_norm, weight_groups
from compress.outputs import ClipOutput
from compress.plugins import DistillLoss, Inheritance, Schedule
from compress.precision import Precision, to_device
from compress.progress import progress
from compress.stopping import StoppedAtStep
from compress.teacher import TeacherSource

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite losses in a row)."""


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


def loss_labels(losses: list[LossTerm]) -> list[str]:
    """Each term's name, or its index where two terms share a name (as in ``weight/<label>``)."""
    names = [t.name for t in losses]
    return [name if names.count(name) == 1 else str(i) for i, name in enumerate(names)]


class DeviceFlag:
    """A 0-dim flag computed on the device, copied without blocking into pinned host memory: :meth:`read`
    waits for that copy only (read one step later, it is long done), not for the queue to drain."""

    def __init__(self, flag: Tensor) -> None:
        self._value: bool | None = None
        if flag.device.type == "cuda":
            self._host = torch.empty((), dtype=torch.bool, pin_memory=True)
            self._host.copy_(flag, non_blocking=True)
            self._event: Any = torch.cuda.Event()
            self._event.record()
        else:  # on the CPU the value is there already
            self._host, self._event = flag.detach().to("cpu", torch.bool), None

    @property
    def known(self) -> bool:
        return self._value is not None

    def read(self) -> bool:
        if self._value is None:
            if self._event is not None:
                self._event.synchronize()
            self._value = bool(self._host)
        return self._value


class StepResult:
    """One optimizer step: whether it was taken or skipped for a non-finite objective or gradient,
    the objective, its terms, the loss weights used and the weights' gradient norm (before clipping).

    With the finite check decided on the device (:attr:`Trainer.defer_finite_check`) the non-finite flag is
    a :class:`DeviceFlag`; reading :attr:`nonfinite` / :attr:`stepped` then waits for it."""

    def __init__(self, stepped: bool, nonfinite: bool | DeviceFlag, loss: Tensor, terms: dict[str, Tensor],
                 weights: list[float], grad_norm: Tensor | None = None) -> None:
        self._stepped, self._nonfinite = stepped, nonfinite
        self.loss, self.terms, self.weights, self.grad_norm = loss, terms, weights, grad_norm

    @property
    def known(self) -> bool:
        """Whether the outcome is on the host already (always, unless decided on the device and not read yet)."""
        return not isinstance(self._nonfinite, DeviceFlag) or self._nonfinite.known

    @property
    def nonfinite(self) -> bool:
        return self._nonfinite.read() if isinstance(self._nonfinite, DeviceFlag) else self._nonfinite

    @property
    def stepped(self) -> bool:
        return not self.nonfinite if isinstance(self._nonfinite, DeviceFlag) else self._stepped


@dataclass
class TrainSummary:
    steps: int
    final_terms: dict[str, float]
    nonfinite_steps: int
    samples_per_s: float
    duration_s: float
    replaced_at: list[int] = field(default_factory=list)


class CosineFrom(Schedule):
    """Cosine decay from ``start_value`` at ``start_step`` to 0 at ``total_steps`` (no warm-up):
    the lr after a strategy made the student smaller (TinyCLIP continues this way after pruning)."""

    def __init__(self, start_value: float, start_step: int, total_steps: int) -> None:
        self.start_value, self.start_step = start_value, start_step
        self.span = max(total_steps - start_step, 1)

    def value(self, step: int) -> float:
        progress = min(max((step - self.start_step) / self.span, 0.0), 1.0)
        return self.start_value * 0.5 * (1.0 + math.cos(math.pi * progress))


def mean_over_ranks(loss: Tensor, terms: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """The objective and its terms averaged over ranks (each rank's loss is over its own rows against
    all ranks' columns: the mean is the loss of the global batch); unchanged on one process."""
    if distributed.world_size() == 1:
        return loss, terms
    local = torch.stack([loss.detach().float(), *(v.detach().float() for v in terms.values())])
    values = distributed.mean_over_ranks(local)
    return values[0], dict(zip(terms, values[1:], strict=True))


def split_batch(batch: Mapping[str, Any], parts: int) -> list[dict[str, Any]]:
    """Split every tensor (and list) of a batch into ``parts`` equal micro-batches."""
    if parts == 1:
        return [dict(batch)]
    size = len(batch["images"])
    if size % parts:
        raise TrainingError(f"batch of {size} cannot be split into {parts} equal micro-batches")
    step = size // parts
    return [
        {k: v[i * step : (i + 1) * step] if isinstance(v, Tensor | list) else v for k, v in batch.items()}
        for i in range(parts)
    ]


class StudentObjective(nn.Module):
    """The student and the loss plug-ins' modules as one module, what DDP wraps: every trained
    parameter of a step (projectors included) is used inside its forward, so DDP's search for
    idle parameters (``find_unused_parameters``) is exact. ``forward(compute)`` is
    ``compute(student)``: the trainer passes the whole objective of one pass."""

    def __init__(self, student: nn.Module, losses: list[LossTerm]) -> None:
        super().__init__()
        self.student = student
        self.losses = nn.ModuleList(t.module for t in losses)

    def forward(self, compute: Callable[[nn.Module], tuple[Tensor, dict[str, Tensor]]]):  # type: ignore[override]
        return compute(self.student)


def compile_towers(student: nn.Module, backend: str = "inductor") -> list[nn.Module]:
    """``torch.compile`` the modules that hold a CLIP student's compute, in place (``nn.Module.compile``):
    the vision tower (``visual``) and the text transformer (``text`` of a CustomTextCLIP, else
    ``transformer``). In place, the modules stay the objects they were: state-dict keys (checkpoints,
    exports) get no ``_orig_mod.`` prefix, DDP wraps the same parameters, and the token embedding, final
    norm and projections around them stay eager. Returns the compiled modules."""
    text = getattr(student, "text", None) if isinstance(getattr(student, "text", None), nn.Module) else None
    candidates = [getattr(student, "visual", None), text if text is not None else getattr(student, "transformer", None)]
    towers = [m for m in candidates if isinstance(m, nn.Module)]
    if not towers:
        raise TrainingError(f"train.compile: the student ({type(student).__name__}) has neither a `visual` tower nor "
                            "a text transformer to compile; set train.compile: false")
    for module in towers:
        module.compile(backend=backend)
    return towers


def gate_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of step ``step``'s gate sample on ``device`` (the trainer's: on CUDA the noise is
    drawn there, no host copy): seeded from (seed, step), so the same on every rank and after a resume."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) % 2**63)


def splice(cached: list[ClipOutput], live: ClipOutput, index: int, live_scale: bool) -> ClipOutput:
    """The accumulated batch's outputs with micro-batch ``index`` replaced by ``live``."""
    parts = cached[:index] + [live] + cached[index + 1 :]
    full = ClipOutput.cat(parts)
    full.logit_scale = live.logit_scale if live_scale else live.logit_scale.detach()
    return full


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
        should_stop: Callable[[], int] | None = None,
    ) -> None:
        self.cfg = cfg
        self.student = student
        self.losses = losses
        self.lr_schedule = lr_schedule
        self.batches = batches
        self.precision = precision
        self.device = precision.device
        self.teacher = teacher
        self.inheritance = inheritance or Inheritance()
        self.run_dir = run_dir
        self.on_checkpoint = on_checkpoint
        self.on_log = on_log
        self.seed = seed
        #: asked after every step: a signal number (every rank the same) stops training there, after a checkpoint
        self.should_stop = should_stop
        self.needs = tuple(sorted({n for term in losses for n in term.module.needs}))
        self.uses_teacher = any(term.module.needs_teacher for term in losses)
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
        optimizer = build_adamw(groups, self.cfg.lr, tuple(self.cfg.betas), self.cfg.eps, fused=fused)
        owned_by_losses = {id(p) for t in self.losses for p in t.module.parameters()}
        #: what the backward of a micro-batch after the first accumulates into (see the module docstring)
        self._later_inputs = [
            p for g in optimizer.param_groups for p in g["params"] if id(p) not in owned_by_losses
        ]
        return optimizer

    def _wrap(self) -> None:
        """``self.objective`` (student and loss modules), in ``DistributedDataParallel`` when there are
        several ranks (``self.model``; its construction broadcasts rank 0's weights)."""
        if distributed.world_size() > 1:
            self._sync_batch_norm()
        self.objective = StudentObjective(self.student, self.losses)
        self.model: nn.Module = self.objective
        if distributed.world_size() > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(self.objective, find_unused_parameters=True)

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
        """sum_k w_k * term_k over the loss plug-ins whose weight w is not 0 (the others are not run)."""
        terms: dict[str, Tensor] = {}
        total = student_out.image_features.new_zeros((), dtype=torch.float32)
        for term, weight in zip(self.losses, weights, strict=True):
            if weight == 0.0:
                continue
            for key, value in term.module(student_out, teacher_out, batch).items():
                name = key if key not in terms else f"{term.name}.{key}"
                terms[name] = value
                total = total + weight * value.float()
        return total, terms

    def _backward(self, loss: Tensor, inputs: list[nn.Parameter] | None = None) -> None:
        if not loss.requires_grad:
            return  # no active loss term and no regulariser this step: nothing to learn from
        scaled = self.scaler.scale(loss) if self.scaler is not None else loss
        scaled.backward(inputs=inputs)

    def _forward_backward(
        self, batch: Mapping[str, Any], step: int, weights: list[float] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Forward and backward of one optimizer step's batch; returns (objective, terms), the
        objective being the weighted loss terms plus the strategy's regulariser."""
        weights = [t.weight_at(step) for t in self.losses] if weights is None else weights
        with one_gate_sample(self.student, gate_generator(self.seed, step, self.device)):
            return self._accumulate(batch, step, weights)

    def _accumulate(
        self, batch: Mapping[str, Any], step: int, weights: list[float]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        micro = split_batch(batch, self.cfg.accum_steps)
        active = [t for t, w in zip(self.losses, weights, strict=True) if w != 0.0]
        teacher_outs = [self.teacher(m) for m in micro] if any(t.module.needs_teacher for t in active) else None
        teacher_full = ClipOutput.cat(teacher_outs) if teacher_outs else None
        cached: list[ClipOutput] | None = None

        def objective(j: int) -> Callable[[nn.Module], tuple[Tensor, dict[str, Tensor]]]:
            """Pass j: micro-batch j live (the others cached); pass 0 adds the strategy's regulariser."""

            def compute(student: nn.Module) -> tuple[Tensor, dict[str, Tensor]]:
                with self.precision.autocast():
                    live = clip_forward(student, micro[j]["images"], micro[j]["texts"], self.needs)
                    out = live if cached is None else splice(cached, live, j, live_scale=j == 0)
                    total, terms = self._loss(out, teacher_full, batch, weights)
                if j:
                    return total, terms
                regular = self.inheritance.regularizer(student, step)
                return total + sum(regular.values(), total.new_zeros(())), {**terms, **regular}

            return compute

        # without an active loss term only the regulariser (no data, the same on every rank) is left
        model = self.model if active else self.objective
        if len(micro) > 1:
            with torch.no_grad(), self.precision.autocast():
                cached = [clip_forward(self.student, m["images"], m["texts"], self.needs) for m in micro]
            with self._no_sync():
                for j in range(1, len(micro)):
                    total, _ = model(objective(j))
                    self._backward(total, inputs=self._later_inputs)
        loss, terms = model(objective(0))
        self._backward(loss)
        return loss.detach(), terms

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

    def train_step(self, batch: Mapping[str, Any], step: int) -> StepResult:
        """Forward, backward and (if everything is finite) one optimizer step on ``batch``."""
        weights = [t.weight_at(step) for t in self.losses]
        loss, terms = mean_over_ranks(*self._forward_backward(batch, step, weights))
        stepped, nonfinite, norm = self._optimizer_step(loss)
        self.optimizer.zero_grad(set_to_none=True)
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
            batch = to_device(next(self.batches), self.device)
            batch_size = len(batch["images"]) * distributed.world_size()  # samples of all ranks
            result = self.train_step(batch, step)
            total, terms = result.loss, result.terms
            is_last = step + 1 == cfg.steps
            is_log = (step + 1) % cfg.log_every == 0 or is_last or step == 0
            checkpoint_now = is_last or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0)
            # a flag decided on the device is read one step later (or now, at a log or checkpoint step)
            self._pending.append((step, result, batch_size))
            window_samples += self._settle(keep=0 if result.known or is_log or checkpoint_now else 1)
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
            stop = self.should_stop() if self.should_stop is not None else 0  # a signal: see compress.stopping
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
        """One line of ``metrics.jsonl``: step, lr, objective, terms, scheduled weights, strategy values."""
        record = {"step": step, "lr": lr, "loss": float(result.loss), "samples_per_s": rate}
        if result.grad_norm is not None:
            record["grad_norm"] = float(result.grad_norm)
        record.update({f"loss/{k}": v for k, v in self.last_terms.items()})
        for label, term, weight in zip(self.labels, self.losses, result.weights, strict=True):
            if term.schedule is not None:
                record[f"weight/{label}"] = weight
        record.update({f"inherit/{k}": v for k, v in self.inheritance.log_values(self.student).items()})
        record["nonfinite_steps"] = self.nonfinite
        return record

    def _replace_student(self, student: nn.Module, step: int, lr: float) -> None:
        """A strategy made the student smaller: new optimizer, cosine decay without warm-up."""
        self.student = student.to(self.device).train()
        self._apply_grad_checkpointing()
        self._apply_compile()
        self.optimizer = self._build_optimizer()
        self._wrap()
        self.lr_schedule = CosineFrom(lr, step, self.cfg.steps)

    def _log(self, record: dict[str, Any]) -> None:
        if not distributed.is_main_process():
            return
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / "metrics.jsonl", "a") as f:
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
        cosine = self.lr_schedule if isinstance(self.lr_schedule, CosineFrom) else None
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "cosine_from": [cosine.start_value, cosine.start_step] if cosine is not None else None,
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
        if state["cosine_from"] is not None:
            lr, step = state["cosine_from"]
            self.lr_schedule = CosineFrom(float(lr), int(step), self.cfg.steps)
        self.step = int(state["step"])
        self.nonfinite, self.in_a_row = int(state["nonfinite"]), int(state["in_a_row"])
        self.samples, self.elapsed_s = int(state["samples"]), float(state["elapsed_s"])
        self.replaced_at = [int(s) for s in state["replaced_at"]]
        self.last_terms = {k: float(v) for k, v in state["last_terms"].items()}
