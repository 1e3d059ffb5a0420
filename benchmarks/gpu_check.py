"""The GPU check's parts (run by ``benchmarks/gpu_check.sh``): each prints one line, ``PASS``, ``FAIL``,
``SKIP`` or ``INFO``, with its numbers.

    python benchmarks/gpu_check.py PART [--cpu-smoke]

PART:

- ``bf16``: a real :class:`~compress.train.Trainer`, a few steps in bf16 against the same steps in fp32
  (TF32 off), ViT-B/32 teacher -> TinyCLIP-ViT-61M-32-Text-29M student, random weights, batch 128.
  Tolerance: every step's objective within 2% (relative) and its gradient norm within 5%, and the
  cosine between the two runs' total weight updates >= 0.9 (Adam's first updates are nearly sign(g)
  lr, so weights with tiny gradients may flip in bf16: the cosine, not an element-wise bound).
- ``speed``: the time of a Trainer step against a hand loop that mirrors open_clip_train's
  ``train_one_epoch`` with ``--distill-model`` (open_clip's models with ``output_dict``, ``DistillClipLoss``
  from ``open_clip.loss``, AdamW with open_clip's decay groups, bf16 autocast, the logit-scale clamp):
  same models, batch 256, same optimizer hyper-parameters, 3 warm-up and 10 timed steps; our objective
  is affinity + clip (the same two terms as ``DistillClipLoss``). PASS when ours / open_clip <= 1.15.
- ``memory``: the peak device memory (``torch.cuda.max_memory_allocated``) of one step at the recipe's
  micro-batch (256, ViT-B/32 teacher -> TinyCLIP-ViT-61M-32-Text-29M, bf16, gradient checkpointing as in
  the recipe, affinity at scale 50) against ``compress.memory.estimate_device_memory`` when that module
  exists (PASS when the measured peak is within 25% of the estimate), else ``estimate: not available``.
- ``ddp``: two processes over NCCL (1 GPU each, half the batch each) against one process with the whole
  batch, fp32 without TF32, Adam eps 1e-4, 3 steps: the final weights within 1e-5 (the attention key biases,
  whose true gradient is 0, within lr x steps; see tests/test_ddp.py). Needs 2 GPUs.
- ``syncbn``: the same with a ResNet student (BatchNorm -> SyncBatchNorm). Needs 2 GPUs.

``--cpu-smoke`` runs every part's code on the CPU with the cc-test models and a small batch (bf16 on the
CPU's autocast, the two-process part over gloo), so that the script is known to run before a GPU is
lent: its timing and memory lines are ``INFO``, not judged.
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
            on_log=None, **train: Any) -> Trainer:
    n = len(batch["images"])
    options = {"log_every": 1, "checkpoint_every": 0, **train}
    cfg = TrainConfig(steps=steps, batch_size=n, accum_steps=1, lr=1e-4, progress=False, precision=precision.name,
                      **options)
    losses = losses or [LossTerm("affinity", 1.0, LOSSES.build({"name": "affinity", "scale": 50.0}))]
    for term in losses:
        term.module.to(setup.device)
    lr = SCHEDULES.build("constant", context={"base_value": cfg.lr})
    return Trainer(cfg, student.to(setup.device), losses, lr, itertools.repeat(batch), precision,
                   teacher=OnlineTeacher(teacher, precision), on_log=on_log)


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


# -- (b) step time against open_clip's distillation loop -------------------------------------------------
def open_clip_loop(setup: Setup, teacher, student, batch: dict, steps: int) -> float:
    """Seconds per step of open_clip_train's ``train_one_epoch`` with a distillation model (accum_freq 1,
    amp_bf16): zero_grad, autocast forward of the student and (no_grad) of the teacher, DistillClipLoss,
    backward, AdamW step, logit-scale clamp. Mirrored, since open_clip_train is not installed."""
    from open_clip.loss import DistillClipLoss

    model, dist_model = student.to(setup.device).train(), teacher.to(setup.device).eval()
    model.output_dict = dist_model.output_dict = True
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.2}],
        lr=1e-4, betas=(0.9, 0.98), eps=1e-6)
    loss = DistillClipLoss(local_loss=False, gather_with_grad=False, cache_labels=True, rank=0, world_size=1)
    autocast = setup.precision("bf16").autocast

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


def _timed(setup: Setup, step, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    setup.sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    setup.sync()
    return (time.perf_counter() - start) / steps


def part_speed(setup: Setup) -> bool:
    steps = 10 if not setup.smoke else 2
    batch = setup.data(256 if not setup.smoke else None)
    teacher, student = models(setup, convert=False)
    theirs = open_clip_loop(setup, teacher, copy.deepcopy(student), batch, steps)
    del teacher
    teacher, student = models(setup)
    losses = [LossTerm("affinity", 1.0, LOSSES.build({"name": "affinity", "scale": "model"})),
              LossTerm("clip", 1.0, LOSSES.build("clip"))]
    t = trainer(setup, teacher, student, setup.precision("bf16"), 10**9, batch, losses=losses, log_every=10**9,
                grad_clip=5.0)
    counter = itertools.count()
    ours = _timed(setup, lambda: t.train_step(batch, next(counter)), steps)
    ratio = ours / theirs
    ok = ratio <= SPEED_RATIO_MAX
    status = "INFO" if setup.smoke else "PASS" if ok else "FAIL"
    line(status, "step time vs open_clip distill loop",
         f"ours {ours * 1e3:.1f} ms, open_clip {theirs * 1e3:.1f} ms per step (batch {len(batch['images'])}, "
         f"bf16): ratio {ratio:.3f} (max {SPEED_RATIO_MAX})")
    return ok or setup.smoke


# -- (c) peak memory against the dry-run estimate --------------------------------------------------------
def memory_estimate(teacher, student, batch: int) -> tuple[float | None, str]:
    """``compress.memory.estimate_device_memory`` for one step at ``batch`` (accum 1, bf16, gradient
    checkpointing, affinity at scale 50), or (None, why) when it is not there."""
    try:
        from compress.config.parsing import config_from_dict
        from compress.memory import estimate_device_memory
    except ImportError as error:
        return None, f"estimate: not available ({error})"
    cfg = config_from_dict({
        "name": "gpu-check", "teacher": {"model": TEACHER, "random_init": True}, "student": {"model": STUDENT},
        "losses": [{"name": "affinity", "weight": 1.0, "scale": 50}],
        "train": {"batch_size": batch, "accum_steps": 1, "precision": "bf16", "grad_checkpointing": True},
    })
    estimate = estimate_device_memory(cfg, student, teacher, world_size=1, precision="bf16")
    parts = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in estimate.parts().items())
    return float(estimate.total), f"estimate {estimate.total / 2**30:.2f} GiB ({parts})"


def part_memory(setup: Setup) -> bool:
    batch = setup.data(256 if not setup.smoke else None)
    teacher, student = models(setup)
    estimate, text = memory_estimate(teacher, student, len(batch["images"]))
    if setup.smoke:
        line("INFO", "peak memory vs estimate", f"CPU smoke, no device peak; {text}")
        return True
    t = trainer(setup, teacher, student, setup.precision("bf16"), 2, batch, grad_checkpointing=True)
    t.train_step(batch, 0)  # the optimizer's moments exist from here on
    setup.sync()
    torch.cuda.reset_peak_memory_stats()
    t.train_step(batch, 1)
    setup.sync()
    peak = torch.cuda.max_memory_allocated()
    if estimate is None:
        line("INFO", "peak memory vs estimate", f"peak {peak / 2**30:.2f} GiB at micro-batch 256; {text}")
        return True
    ratio = peak / estimate
    ok = abs(ratio - 1.0) <= MEMORY_TOL
    line("PASS" if ok else "FAIL", "peak memory vs estimate",
         f"peak {peak / 2**30:.2f} GiB at micro-batch 256, {text}: measured/estimate {ratio:.2f} "
         f"(within {MEMORY_TOL:.0%})")
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
        t = trainer(setup, teacher, student, setup.precision("fp32"), 3, share, eps=DDP_EPS)
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
