"""The GPU check's parts (run by ``benchmarks/gpu_check.sh``): each prints one line, ``PASS``, ``FAIL``,
``SKIP`` or ``INFO``, with its numbers.

    python benchmarks/gpu_check.py PART [--cpu-smoke]

PART:

- ``bf16``: a real :class:`~compress.train.Trainer`, a few steps in bf16 against the same steps in fp32
  (TF32 off), ViT-B/32 teacher -> TinyCLIP-ViT-61M-32-Text-29M student, random weights, batch 128.
  Tolerance: every step's objective within 2% (relative) and its gradient norm within 5%, and the
  cosine between the two runs' total weight updates >= 0.9 (Adam's first updates are nearly sign(g)
  lr, so weights with tiny gradients may flip in bf16: the cosine, not an element-wise bound).
- ``speed``: the time of a Trainer step against open_clip_train's own ``train_one_epoch``
  (``open_clip_train.train``, installed with open_clip_torch 3.x), called as its ``main`` would with
  ``--distill-model``: the frozen teacher as ``dist_model``, the loss from ``open_clip.create_loss(args)``
  (``DistillClipLoss``), AdamW with open_clip_train's decay groups, ``const_lr``, no grad scaler (bf16),
  ``--grad-clip-norm 5``, fed an in-memory epoch (``DataInfo`` over a loader of ``(images, texts)`` with
  ``num_batches`` / ``num_samples``); same models, micro-batch 256, optimizer hyper-parameters and precision
  (bf16 autocast) as ours, 3 warm-up steps (one call) and 10 timed steps (one call: its logging at an epoch's
  first and last step is part of it). Our objective is affinity + clip (the two terms of ``DistillClipLoss``).
  K = 1: one line. K = 4 (``--accum-freq 4`` = our ``train.accum_steps 4``, micro-batch 256, 5 timed
  steps): open_clip_train 3.x cannot distill under accumulation (``main.py`` asserts ``accum_freq == 1``
  with a distill model; the accumulation branch never calls ``dist_model``, so ``DistillClipLoss`` misses
  its ``dist_*`` arguments). The part tries one such step; while it fails, the K = 4 line times its
  feature-caching accumulation with ``ClipLoss`` against our Trainer with the clip loss alone, no teacher
  on either side (the line quotes the error). PASS when ours / open_clip <= 1.15, on each line. Where
  open_clip_train cannot be imported, K = 1 falls back to a hand loop mirroring ``train_one_epoch`` (the
  line says so) and K = 4 is SKIP.
- ``memory``: the peak device memory (``torch.cuda.max_memory_allocated``) of one step (the optimizer's
  moments already allocated) at the recipe's micro-batch (256, ViT-B/32 teacher -> TinyCLIP-ViT-61M-32-Text-29M,
  bf16, gradient checkpointing as in the recipe, affinity at scale 50), at K = 1 and at K = 4 micro-batches
  (global batch 1024: the gradient cache's features and the similarity matrices of the whole step), each
  against ``compress.memory.estimate_device_memory`` for that K (PASS when the measured peak is within 25% of
  the estimate; ``estimate: not available`` where the module is missing).
- ``ddp``: two processes over NCCL (1 GPU each, half the batch each) against one process with the whole
  batch, fp32 without TF32, Adam eps 1e-4, 3 steps: the final weights within 1e-5 (the attention key biases,
  whose true gradient is 0, within lr x steps; see tests/test_ddp.py). Needs 2 GPUs.
- ``syncbn``: the same with a ResNet student (BatchNorm -> SyncBatchNorm). Needs 2 GPUs.

``--cpu-smoke`` runs every part's code on the CPU with the cc-test models and a small batch (bf16 on the
CPU's autocast, the two-process part over gloo; the speed part in fp32 through the same
``train_one_epoch`` calls, K = 1 and 4), so that the script is known to run before a GPU is lent: its
timing and memory lines are ``INFO``, not judged.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import math
import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.config import TrainConfig  # noqa: E402
from compress.models import load_model  # noqa: E402
from compress.precision import Precision  # noqa: E402
from compress.registry import LOSSES, SCHEDULES  # noqa: E402
from compress.teacher import OnlineTeacher  # noqa: E402
from compress.train import LossTerm, Trainer  # noqa: E402

TEACHER, STUDENT = "ViT-B-32", "TinyCLIP-ViT-61M-32-Text-29M"
TEST_TEACHER, TEST_STUDENT = "cc-test-teacher", "cc-test-student"
RN_TEACHER, RN_STUDENT = "cc-test-rn-teacher", "cc-test-rn-student"
LOSS_TOL, NORM_TOL, UPDATE_COSINE = 2e-2, 5e-2, 0.9
SPEED_RATIO_MAX = 1.15
MEMORY_TOL = 0.25
DDP_TOL = 1e-5
#: Adam's eps in the two-process parts: with 1e-6 a rounding difference dg of a near-0 gradient moves a weight by
#: lr * dg / eps, which measures Adam's amplification, not the data-parallel gradient (tests/test_ddp.py)
DDP_EPS = 1e-4


@dataclass
class Setup:
    """Models, batch and device of a part: the real sizes on a GPU, the cc-test ones in the CPU smoke."""

    smoke: bool
    device: torch.device
    teacher: str
    student: str
    batch: int
    image: int

    @classmethod
    def make(cls, smoke: bool, batch: int) -> Setup:
        if smoke:
            return cls(True, torch.device("cpu"), TEST_TEACHER, TEST_STUDENT, 16, 32)
        return cls(False, torch.device("cuda"), TEACHER, STUDENT, batch, 224)

    def precision(self, name: str) -> Precision:
        return Precision(name, self.device)  # bf16 on the CPU: CPU autocast (smoke only)

    def data(self, n: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
        n = n or self.batch
        g = torch.Generator().manual_seed(seed)
        images = torch.randn(n, 3, self.image, self.image, generator=g)
        texts = torch.randint(1, 49406, (n, 77 if not self.smoke else 16), generator=g)
        return {"images": images.to(self.device), "texts": texts.to(self.device)}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def line(status: str, part: str, text: str) -> None:
    print(f"{status} {part}: {text}", flush=True)


def no_tf32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def models(setup: Setup, teacher: str | None = None, student: str | None = None, convert: bool = True):
    torch.manual_seed(0)
    t = load_model(teacher or setup.teacher, convert=convert)
    s = load_model(student or setup.student, convert=convert)
    return t, s


def trainer(setup: Setup, teacher, student, precision: Precision, steps: int, batch: dict, losses=None,
            on_log=None, accum_steps: int = 1, world: int = 1, **train: Any) -> Trainer:
    """A Trainer on ``batch`` repeated, one micro-batch of ``accum_steps`` on each of ``world`` processes
    (``train.batch_size`` = micro-batch x ``accum_steps`` x ``world``); ``teacher`` None: no teacher."""
    n = len(batch["images"]) * world
    options = {"log_every": 1, "checkpoint_every": 0, **train}
    cfg = TrainConfig(steps=steps, batch_size=n * accum_steps, accum_steps=accum_steps, lr=1e-4, progress=False,
                      precision=precision.name, **options)
    losses = losses or [LossTerm("affinity", 1.0, LOSSES.build({"name": "affinity", "scale": 50.0}))]
    for term in losses:
        term.module.to(setup.device)
    lr = SCHEDULES.build("constant", context={"base_value": cfg.lr})
    return Trainer(cfg, student.to(setup.device), losses, lr, itertools.repeat(batch), precision,
                   teacher=None if teacher is None else OnlineTeacher(teacher, precision), on_log=on_log)


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten().cpu() for p in model.parameters()])


# -- (a) bf16 against fp32 -------------------------------------------------------------------------------
def part_bf16(setup: Setup) -> bool:
    no_tf32()
    teacher, student = models(setup)
    start = _flat(student)
    batch = setup.data(128 if not setup.smoke else None)
    runs = {}
    for name in ("fp32", "bf16"):
        records: list[dict] = []
        t = trainer(setup, teacher, copy.deepcopy(student), setup.precision(name), 3, batch, on_log=records.append)
        t.fit()
        runs[name] = (records, _flat(t.student) - start)
    (ref, d_ref), (low, d_low) = runs["fp32"], runs["bf16"]
    loss_err = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(ref, low, strict=True))
    norm_err = max(abs(a["grad_norm"] - b["grad_norm"]) / a["grad_norm"] for a, b in zip(ref, low, strict=True))
    cosine = float(torch.nn.functional.cosine_similarity(d_ref, d_low, dim=0))
    ok = loss_err <= LOSS_TOL and norm_err <= NORM_TOL and cosine >= UPDATE_COSINE
    line("PASS" if ok else "FAIL", "bf16 step equality vs fp32",
         f"{len(ref)} steps, batch {len(batch['images'])}: max loss rel diff {loss_err:.2e} (tol {LOSS_TOL}), "
         f"max grad-norm rel diff {norm_err:.2e} (tol {NORM_TOL}), update cosine {cosine:.4f} (min {UPDATE_COSINE})")
    return ok


# -- (b) step time against open_clip_train's own loop ----------------------------------------------------
SPEED_ACCUM = 4  # K of the accumulated comparison: our train.accum_steps = open_clip_train's --accum-freq


class _Loader:
    """The in-memory stand-in of open_clip_train's data loader: iterates ``(images, texts)`` batches and
    carries the ``num_batches`` / ``num_samples`` that ``train_one_epoch`` reads."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = batches
        self.num_batches = len(batches)
        self.num_samples = sum(len(images) for images, _ in batches)

    def __iter__(self):
        return iter(self.batches)


def open_clip_args(setup: Setup, precision: str, micro: int, accum: int, distill: bool) -> argparse.Namespace:
    """The fields of open_clip_train's parsed arguments that ``train_one_epoch`` and ``create_loss`` read
    (one process, no wandb / tensorboard / horovod; logging every 10**9 steps, i.e. at an epoch's first
    and last step only, as open_clip_train always does)."""
    return argparse.Namespace(
        device=str(setup.device), precision=precision, accum_freq=accum, distill=distill, skip_scheduler=False,
        horovod=False, grad_clip_norm=5.0, log_every_n_steps=10**9, batch_size=micro, world_size=1, rank=0,
        local_rank=0, wandb=False, save_logs=False, local_loss=False, gather_with_grad=False, model=setup.student,
        siglip=False, distill_model=setup.teacher if distill else None)


def open_clip_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """open_clip_train's AdamW: no weight decay on gains, biases and the logit scale (main.py's ``exclude``);
    the hyper-parameters are our TrainConfig's defaults (lr 1e-4, betas (0.9, 0.98), eps 1e-6, decay 0.2)."""
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.2}],
        lr=1e-4, betas=(0.9, 0.98), eps=1e-6)


def open_clip_train_time(setup: Setup, student, teacher, micro: list[dict], steps: int, precision: str,
                         warmup: int = 3) -> float:
    """Seconds per optimizer step of open_clip_train's real ``train_one_epoch`` (``open_clip_train.train``):
    with ``teacher`` as ``dist_model`` (``--distill-model``: ``DistillClipLoss`` from ``create_loss(args)``),
    else the contrastive ``ClipLoss``; ``micro`` is one step's micro-batches (``len(micro)`` =
    ``--accum-freq``), fed as an in-memory epoch of ``warmup`` (one call) then ``steps`` (timed call) steps."""
    from open_clip import create_loss
    from open_clip_train.data import DataInfo
    from open_clip_train.scheduler import const_lr
    from open_clip_train.train import train_one_epoch

    accum = len(micro)
    args = open_clip_args(setup, precision, len(micro[0]["images"]), accum, teacher is not None)
    model = student.to(setup.device)
    model.output_dict = True
    if teacher is not None:
        teacher = teacher.to(setup.device)
        teacher.output_dict = True
    optimizer = open_clip_optimizer(model)
    scheduler = const_lr(optimizer, 1e-4, 0, warmup + steps)
    loss = create_loss(args)
    batches = [(m["images"], m["texts"]) for m in micro]

    def epoch(n: int, index: int) -> None:
        data = {"train": DataInfo(_Loader(batches * n))}
        train_one_epoch(model, data, loss, index, optimizer, None, scheduler, teacher, args)

    epoch(warmup, 0)
    setup.sync()
    start = time.perf_counter()
    epoch(steps, 1)
    setup.sync()
    return (time.perf_counter() - start) / steps


def open_clip_mirror_time(setup: Setup, student, teacher, batch: dict, steps: int, precision: str) -> float:
    """Seconds per step of a hand loop that mirrors ``train_one_epoch`` with ``--distill-model`` (accum_freq
    1): zero_grad, autocast forward of the student and (no_grad) of the teacher, DistillClipLoss, backward,
    AdamW step, logit-scale clamp. The fallback where open_clip_train cannot be imported."""
    from open_clip.loss import DistillClipLoss

    model, dist_model = student.to(setup.device).train(), teacher.to(setup.device).eval()
    model.output_dict = dist_model.output_dict = True
    optimizer = open_clip_optimizer(model)
    loss = DistillClipLoss(local_loss=False, gather_with_grad=False, cache_labels=True, rank=0, world_size=1)
    autocast = setup.precision(precision).autocast

    def step() -> None:
        optimizer.zero_grad()
        with autocast():
            model_out = model(batch["images"], batch["texts"])
            with torch.no_grad():
                dist_model_out = dist_model(batch["images"], batch["texts"])
            model_out.update({f"dist_{k}": v for k, v in dist_model_out.items()})
            losses = loss(**model_out, output_dict=True)
            total_loss = sum(losses.values())
        total_loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0, norm_type=2.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    return _timed(setup, step, steps)


def open_clip_distills_under_accumulation(setup: Setup, student, teacher, micro: list[dict], precision: str
                                          ) -> str | None:
    """None when open_clip_train's ``train_one_epoch`` runs one step with ``--distill-model`` at
    ``--accum-freq`` ``len(micro)``, else why not. (open_clip 3.x: main.py asserts ``accum_freq == 1`` under
    distillation, and the accumulation branch never calls ``dist_model``, so ``DistillClipLoss`` lacks its
    ``dist_*`` arguments.)"""
    try:
        open_clip_train_time(setup, copy.deepcopy(student), teacher, micro, 1, precision, warmup=0)
    except TypeError as error:
        return f"{type(error).__name__}: {error}"
    return None


def _timed(setup: Setup, step, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    setup.sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    setup.sync()
    return (time.perf_counter() - start) / steps


def our_time(setup: Setup, teacher, student, micro: list[dict], steps: int, precision: str, warmup: int = 3
             ) -> float:
    """Seconds per optimizer step of our Trainer's ``train_step`` on one step's micro-batches
    (``train.accum_steps = len(micro)``): affinity + clip with ``teacher`` (the two terms of
    ``DistillClipLoss``), the clip loss alone without."""
    losses = [LossTerm("clip", 1.0, LOSSES.build("clip"))]
    if teacher is not None:
        losses.insert(0, LossTerm("affinity", 1.0, LOSSES.build({"name": "affinity", "scale": "model"})))
    t = trainer(setup, teacher, student, setup.precision(precision), 10**9, micro[0], losses=losses,
                log_every=10**9, grad_clip=5.0, accum_steps=len(micro))
    counter = itertools.count()
    return _timed(setup, lambda: t.train_step(micro, next(counter)), steps, warmup)


def _speed_line(setup: Setup, label: str, ours: float, theirs: float, what: str) -> bool:
    ratio = ours / theirs
    ok = ratio <= SPEED_RATIO_MAX
    status = "INFO" if setup.smoke else "PASS" if ok else "FAIL"
    line(status, label, f"ours {ours * 1e3:.1f} ms, theirs {theirs * 1e3:.1f} ms per step: ratio {ratio:.3f} "
                        f"(max {SPEED_RATIO_MAX}); theirs: {what}")
    return ok or setup.smoke


def part_speed(setup: Setup) -> bool:
    """K = 1: our Trainer (affinity + clip, teacher) against open_clip_train's ``train_one_epoch`` with
    ``--distill-model``; K = SPEED_ACCUM at the same micro-batch: against ``--accum-freq K`` (contrastive
    only on both sides where open_clip_train cannot distill under accumulation)."""
    steps, accum_steps = (10, 5) if not setup.smoke else (2, 1)
    precision, theirs_precision = ("fp32", "fp32") if setup.smoke else ("bf16", "amp_bf16")
    size = 256 if not setup.smoke else None
    batch = setup.data(size)
    micro = [setup.data(size, seed=j) for j in range(SPEED_ACCUM)]
    where = f"micro-batch {len(batch['images'])}, {precision}"
    try:
        import open_clip_train.train  # noqa: F401
        real = True
    except ImportError as error:
        real, missing = False, f"{type(error).__name__}: {error}"
    oc_teacher, oc_student = models(setup, convert=False)
    if real:
        theirs = open_clip_train_time(setup, copy.deepcopy(oc_student), oc_teacher, [batch], steps, theirs_precision)
        label, what = "step time vs open_clip_train distill K=1", "open_clip_train.train_one_epoch"
    else:
        theirs = open_clip_mirror_time(setup, copy.deepcopy(oc_student), oc_teacher, batch, steps, precision)
        label = "step time vs open_clip distill mirror K=1"
        what = f"a mirror of train_one_epoch (open_clip_train not importable: {missing})"
    teacher, student = models(setup)
    ours = our_time(setup, teacher, copy.deepcopy(student), [batch], steps, precision)
    ok = _speed_line(setup, label, ours, theirs, f"{what} with --distill-model, {where}")
    k = f"K={SPEED_ACCUM}"
    if not real:
        line("SKIP", f"step time vs open_clip_train {k}",
             "open_clip_train not importable; the mirror covers K=1 only")
        return ok
    why = open_clip_distills_under_accumulation(setup, oc_student, oc_teacher, micro, theirs_precision)
    if why is None:  # a later open_clip_train that distills under --accum-freq
        theirs = open_clip_train_time(setup, copy.deepcopy(oc_student), oc_teacher, micro, accum_steps,
                                      theirs_precision)
        ours = our_time(setup, teacher, copy.deepcopy(student), micro, accum_steps, precision)
        return _speed_line(setup, f"step time vs open_clip_train distill {k}", ours, theirs,
                           f"open_clip_train.train_one_epoch with --distill-model --accum-freq {SPEED_ACCUM}, "
                           f"{where}; ours: train.accum_steps {SPEED_ACCUM}") and ok
    del oc_teacher, teacher
    theirs = open_clip_train_time(setup, copy.deepcopy(oc_student), None, micro, accum_steps, theirs_precision)
    ours = our_time(setup, None, copy.deepcopy(student), micro, accum_steps, precision)
    return _speed_line(setup, f"step time vs open_clip_train contrastive {k}", ours, theirs,
                       f"open_clip_train.train_one_epoch with --accum-freq {SPEED_ACCUM} and ClipLoss, {where}; ours: "
                       f"train.accum_steps {SPEED_ACCUM}, clip loss, no teacher on either side (open_clip_train has "
                       f"no --distill-model under --accum-freq > 1: {why.splitlines()[0]})") and ok


# -- (c) peak memory against the dry-run estimate --------------------------------------------------------
MEMORY_ACCUM = 4  # K of the accumulated measurement, at the same micro-batch


def memory_estimate(teacher, student, micro: int, accum: int) -> tuple[float | None, str]:
    """``compress.memory.estimate_device_memory`` for one step of ``accum`` micro-batches of ``micro`` (bf16,
    gradient checkpointing, affinity at scale 50), or (None, why) when it is not there."""
    try:
        from compress.memory import estimate_device_memory
        from compress.recipe import config_from_dict
    except ImportError as error:
        return None, f"estimate: not available ({error})"
    cfg = config_from_dict({
        "name": "gpu-check", "teacher": {"model": TEACHER, "random_init": True}, "student": {"model": STUDENT},
        "losses": [{"name": "affinity", "weight": 1.0, "scale": 50}],
        "train": {"batch_size": micro * accum, "accum_steps": accum, "precision": "bf16", "grad_checkpointing": True},
    })
    estimate = estimate_device_memory(cfg, student, teacher, world_size=1, precision="bf16")
    parts = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in estimate.parts().items())
    return float(estimate.total), f"estimate {estimate.total / 2**30:.2f} GiB ({parts})"


def part_memory(setup: Setup) -> bool:
    """The peak of one step (the optimizer's moments already there) at K = 1 and at K = MEMORY_ACCUM
    micro-batches of the same size, each against the estimate for that K."""
    size = 256 if not setup.smoke else None
    teacher, student = models(setup)
    ok = True
    for accum in (1, MEMORY_ACCUM):
        micro = [setup.data(size, seed=j) for j in range(accum)]
        n = len(micro[0]["images"])
        where = f"micro-batch {n} x K={accum}"
        estimate, text = memory_estimate(teacher, student, n, accum)
        t = trainer(setup, teacher, copy.deepcopy(student), setup.precision("bf16"), 2, micro[0],
                    grad_checkpointing=True, accum_steps=accum)
        t.train_step(micro, 0)  # the optimizer's moments exist from here on
        if setup.smoke:
            t.train_step(micro, 1)
            line("INFO", f"peak memory vs estimate K={accum}", f"CPU smoke, no device peak ({where}); {text}")
            continue
        setup.sync()
        torch.cuda.reset_peak_memory_stats()
        t.train_step(micro, 1)
        setup.sync()
        peak = torch.cuda.max_memory_allocated()
        del t
        torch.cuda.empty_cache()
        if estimate is None:
            line("INFO", f"peak memory vs estimate K={accum}", f"peak {peak / 2**30:.2f} GiB at {where}; {text}")
            continue
        ratio = peak / estimate
        good = abs(ratio - 1.0) <= MEMORY_TOL
        ok = ok and good
        line("PASS" if good else "FAIL", f"peak memory vs estimate K={accum}",
             f"peak {peak / 2**30:.2f} GiB at {where}, {text}: measured/estimate {ratio:.2f} (within {MEMORY_TOL:.0%})")
    return ok


# -- (d) two processes against one -----------------------------------------------------------------------
def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_share(rank: int, world: int, port: int, smoke: bool, names: tuple[str, str], out: str) -> None:
    """One rank: its share of the batch, 3 steps, its final weights saved to ``out`` (rank 0)."""
    import torch.distributed as dist

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    setup = Setup.make(smoke, 32)
    device = torch.device("cpu") if smoke else torch.device("cuda", rank)
    if not smoke:
        torch.cuda.set_device(device)
        no_tf32()
    setup.device = device
    dist.init_process_group("gloo" if smoke else "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        teacher, student = models(setup, *names)
        whole = setup.data(setup.batch * world)
        share = {k: v.chunk(world)[rank] for k, v in whole.items()}
        t = trainer(setup, teacher, student, setup.precision("fp32"), 3, share, eps=DDP_EPS, world=world)
        t.fit()
        if rank == 0:
            torch.save({k: v.cpu() for k, v in t.student.state_dict().items()}, out)
    finally:
        dist.destroy_process_group()


def part_two_processes(setup: Setup, names: tuple[str, str], label: str) -> bool:
    import tempfile

    import torch.multiprocessing as mp

    if not setup.smoke and torch.cuda.device_count() < 2:
        line("SKIP", label, f"{torch.cuda.device_count()} GPU(s) here; two processes need 2 GPUs (one each)")
        return True
    if not setup.smoke:
        no_tf32()
    teacher, student = models(setup, *names)
    whole = setup.data(setup.batch * 2)
    t = trainer(setup, teacher, student, setup.precision("fp32"), 3, whole, eps=DDP_EPS)
    t.fit()
    reference = {k: v.detach().cpu() for k, v in t.student.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.pt")
        mp.spawn(_train_share, args=(2, _free_port(), setup.smoke, names, out), nprocs=2, join=True)
        shared = torch.load(out)
    worst, keys = _weight_diffs(reference, shared)
    ok = worst <= DDP_TOL and keys <= 3 * 1e-4
    backend = "gloo (CPU smoke)" if setup.smoke else "NCCL"
    line("PASS" if ok else "FAIL", label,
         f"2 processes ({backend}) x {setup.batch} vs 1 process x {2 * setup.batch}, 3 fp32 steps (Adam eps "
         f"{DDP_EPS}): max weight diff {worst:.2e} (tol {DDP_TOL}); attention key biases {keys:.2e} (bound lr x "
         "steps = 3e-4: their true gradient is 0, rounding noise moves them)")
    return ok


def _weight_diffs(reference: dict, other: dict) -> tuple[float, float]:
    """Max |difference| over the weights, and over the attention key biases apart: a key bias adds the same
    number to every logit of a query (softmax ignores it), so its gradient is rounding noise that Adam
    turns into steps of up to lr (tests/test_ddp.py's docstring)."""
    worst = keys = 0.0
    for name, value in reference.items():
        if not value.is_floating_point():
            continue
        diff = (other[name].float() - value.float()).abs()
        if name.endswith("in_proj_bias"):
            k = diff.numel() // 3
            keys = max(keys, float(diff[k:2 * k].max()) if k else 0.0)
            diff = torch.cat([diff[:k], diff[2 * k:]])
        worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
    return worst, keys


def part_ddp(setup: Setup) -> bool:
    names = (TEST_TEACHER, TEST_STUDENT) if setup.smoke else ("cc-demo-teacher", "cc-demo-student")
    return part_two_processes(setup, names, "two-process equality")


def part_syncbn(setup: Setup) -> bool:
    if setup.smoke:
        line("SKIP", "SyncBatchNorm two-process equality", "CPU smoke: torch has no SyncBatchNorm on CPU")
        return True
    return part_two_processes(setup, (RN_TEACHER, RN_STUDENT), "SyncBatchNorm two-process equality")


PARTS = {"bf16": part_bf16, "speed": part_speed, "memory": part_memory, "ddp": part_ddp, "syncbn": part_syncbn}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=[*PARTS, "all"])
    parser.add_argument("--cpu-smoke", action="store_true", help="run the parts' code on the CPU with tiny models")
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("FAIL gpu check: no CUDA device (use --cpu-smoke to run the code on the CPU)", flush=True)
        return 1
    ok = True
    for name in PARTS if args.part == "all" else [args.part]:
        try:
            ok = PARTS[name](Setup.make(args.cpu_smoke, 256)) and ok
        except Exception as error:  # one line per part, whatever happens; the traceback to stderr
            traceback.print_exc()
            line("FAIL", name, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
