"""Gradient accumulation at a fixed global batch: K = 1, 4, 16 micro-batches per step.

For each K it reports, from a real :class:`~compress.train.Trainer` and the real training loader:

- the similarity products (B x B logits) the loss computes per optimizer step (counted by wrapping
  the loss modules' ``scaled_similarity``): the gradient cache computes the loss once, so it must not
  grow with K (the scheme before recomputed it in every micro-batch pass: 4 K with affinity);
- the loader's host memory: the bytes of one micro-batch as the real loader collates it (synthetic
  data, the student's image size), the batches in flight (``num_workers x prefetch_factor``
  micro-batches, what the workers' shared memory holds at most) and the step's micro-batches the
  trainer keeps on the host (K micro-batches = the process's share of the step). Computed from the
  tensors' sizes (``nbytes``), not from the process's RSS, which the allocator blurs;
- the time of one optimizer step, as a ratio against K = 1 (median of rounds, interleaved).

A second table (``--second-reading``) measures where the gradient cache's live pass gets a step's
micro-batches again (``train.accum_inputs``), on the real training pipeline (synthetic data rendered and
augmented per sample, no workers) at a fixed micro-batch: the image bytes of the step's micro-batches
still alive when the loss runs (measured: weak references to every micro-batch the stream yielded),
which must not grow with K under ``reread`` and grows as K micro-batches under ``keep``, and the step
time of ``reread`` (every sample decoded twice) against ``keep``.

    python benchmarks/bench_accumulation.py [--batch 256] [--steps 2] [--rounds 3] [--workers 8] [--threads 1]
    python benchmarks/bench_accumulation.py --second-reading [--micro 64] [--steps 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import strategies.losses.affinity as affinity_module
from compress.config import TrainConfig
from compress.data.pipeline import train_batches
from compress.models import load_model
from compress.precision import resolve_device, resolve_precision
from compress.recipe import config_from_dict
from compress.registry import LOSSES, SCHEDULES
from compress.teacher import OnlineTeacher, freeze
from compress.train import LossTerm, Trainer

KS = (1, 4, 16)
#: DataLoader's default prefetch_factor: batches each worker prepares ahead
PREFETCH = 2


def batch_bytes(batch: dict) -> int:
    return sum(v.nbytes for v in batch.values() if isinstance(v, torch.Tensor))


def loader_micro_batch(student_name: str, batch: int, accum: int) -> dict:
    """One micro-batch from the real training loader (synthetic data, no workers)."""
    cfg = config_from_dict({
        "name": "bench", "teacher": {"model": "cc-test-teacher", "random_init": True},
        "student": {"model": student_name}, "inheritance": {"name": "manual"}, "losses": [{"name": "affinity"}],
        "data": {"train": {"kind": "synthetic", "num_samples": batch}, "num_workers": 0},
        "train": {"steps": 1, "batch_size": batch, "accum_steps": accum},
    })
    stream, _ = train_batches(cfg, load_model(student_name), None, torch.device("cpu"))
    return next(stream)


def step_times(args: argparse.Namespace, precision, teacher, base, micro: dict, accum: int) -> tuple[float, int]:
    """Seconds per optimizer step and similarity products per step of a Trainer at ``accum``."""
    counted = []
    original = affinity_module.scaled_similarity

    def counting(rows, cols, scale):
        counted.append(1)
        return original(rows, cols, scale)

    affinity_module.scaled_similarity = counting
    try:
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch, accum_steps=accum, lr=1e-4, progress=False,
                          log_every=10**9)
        losses = [LossTerm("affinity", 1.0, LOSSES.build({"name": "affinity", "scale": 50}))]
        stream = iter([micro] * (args.steps * accum))
        trainer = Trainer(cfg, copy.deepcopy(base), losses, SCHEDULES.build("constant", context={"base_value": 1e-4}),
                          stream, precision, teacher=OnlineTeacher(teacher, precision))
        start = time.perf_counter()
        trainer.fit()
        if precision.device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.steps, len(counted) // args.steps
    finally:
        affinity_module.scaled_similarity = original


def second_reading(args: argparse.Namespace, teacher, base, accum: int, inputs: str) -> tuple[float, int]:
    """Seconds per step and the peak image bytes of the step's micro-batches alive at the loss, on the real
    pipeline with ``train.accum_inputs: inputs`` at micro-batch ``args.micro``."""
    import weakref

    cfg = config_from_dict({
        "name": "bench", "teacher": {"model": args.teacher, "random_init": True},
        "student": {"model": args.student}, "inheritance": {"name": "manual"},
        "losses": [{"name": "affinity", "scale": 50}],
        "data": {"train": {"kind": "synthetic", "num_samples": 4 * args.micro * accum * args.steps},
                 "num_workers": 0},
        "train": {"steps": args.steps, "batch_size": args.micro * accum, "accum_steps": accum,
                  "accum_inputs": inputs, "lr": 1e-4, "progress": False, "log_every": 10**9},
    })
    student = copy.deepcopy(base)
    stream, stats = train_batches(cfg, student, None, torch.device("cpu"))
    drawn: list = []

    class Recorded:
        def __next__(self):
            batch = next(stream)
            drawn.append(weakref.ref(batch["images"]))
            return batch

    precision = resolve_precision("fp32", torch.device("cpu"))
    losses = [LossTerm("affinity", 1.0, LOSSES.build({"name": "affinity", "scale": 50}))]
    peak = [0]

    def measure(*_):
        alive = [ref() for ref in drawn]
        peak[0] = max(peak[0], sum(t.nbytes for t in alive if t is not None))

    losses[0].module.register_forward_pre_hook(measure)
    trainer = Trainer(cfg.train, student, losses, SCHEDULES.build("constant", context={"base_value": 1e-4}),
                      Recorded(), precision, teacher=OnlineTeacher(teacher, precision), replay=stats.replay)
    start = time.perf_counter()
    trainer.fit()
    return (time.perf_counter() - start) / args.steps, peak[0]


def second_reading_table(args: argparse.Namespace, teacher, base) -> None:
    times: dict[tuple[int, str], list[float]] = {}
    peaks: dict[tuple[int, str], int] = {}
    modes = ("keep", "reread")
    for k in KS:  # warm-up
        second_reading(args, teacher, base, k, "reread")
    for _ in range(args.rounds):
        for k in KS:
            for mode in modes:
                seconds, peaks[k, mode] = second_reading(args, teacher, base, k, mode)
                times.setdefault((k, mode), []).append(seconds)
    print(f"micro-batch {args.micro}, student {args.student}, teacher {args.teacher}, fp32 on the CPU, no workers")
    print("| K | global batch | step's images alive at the loss, keep MiB | reread MiB | s / step keep | "
          "s / step reread | reread / keep |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for k in KS:
        keep, again = statistics.median(times[k, "keep"]), statistics.median(times[k, "reread"])
        print(f"| {k} | {k * args.micro} | {peaks[k, 'keep'] / 2**20:.2f} | {peaks[k, 'reread'] / 2**20:.2f} | "
              f"{keep:.3f} | {again:.3f} | {again / keep:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="cc-test-teacher")
    parser.add_argument("--student", default="cc-test-student")
    parser.add_argument("--batch", type=int, default=256, help="global batch (one process)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=8, help="data.num_workers of the memory estimate")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared CPU)")
    parser.add_argument("--second-reading", action="store_true",
                        help="the table of train.accum_inputs (reread against keep) at a fixed micro-batch")
    parser.add_argument("--micro", type=int, default=64, help="micro-batch of --second-reading")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.second_reading:
        torch.manual_seed(0)
        second_reading_table(args, freeze(load_model(args.teacher)), load_model(args.student))
        return
    device = resolve_device(args.device)
    precision = resolve_precision("auto", device)
    torch.manual_seed(0)
    teacher = freeze(load_model(args.teacher, device=device))
    base = load_model(args.student, device=device)
    micro = {k: loader_micro_batch(args.student, args.batch, k) for k in KS}
    times: dict[int, list[float]] = {k: [] for k in KS}
    products: dict[int, int] = {}
    for k in KS:  # warm-up
        step_times(args, precision, teacher, base, micro[k], k)
    for _ in range(args.rounds):
        for k in KS:
            seconds, products[k] = step_times(args, precision, teacher, base, micro[k], k)
            times[k].append(seconds)
    print(f"device {device} precision {precision.name} global batch {args.batch} student {args.student} "
          f"teacher {args.teacher}; memory with {args.workers} workers x prefetch {PREFETCH}")
    print("| K | micro-batch | similarity products / step | micro-batch MiB | in flight MiB (before: whole-step "
          "batches) | step kept on host MiB | s / step | ratio vs K=1 |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    base_time = statistics.median(times[1])
    for k in KS:
        size = batch_bytes(micro[k])
        median = statistics.median(times[k])
        in_flight, before = args.workers * PREFETCH * size / 2**20, args.workers * PREFETCH * k * size / 2**20
        print(f"| {k} | {len(micro[k]['images'])} | {products[k]} | {size / 2**20:.2f} | {in_flight:.1f} "
              f"({before:.1f}) | {k * size / 2**20:.1f} | {median:.3f} | {median / base_time:.2f} |")

if __name__ == "__main__":
    main()
