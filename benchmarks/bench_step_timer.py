"""The per-step timing's cost: training steps with the step timer (:mod:`compress.step_timer`) vs without it.

Prints the throughput ratio timed / untimed (goal: >= 0.99) and the timed segments per step. Both run in this
process on the same models and batch, interleaved in rounds, and the median round is reported. Small
micro-batches with many of them per step (``--accum``) are the timer's worst case: it times each micro-batch's
teacher pass, features pass and live pass, so its work grows with ``accum_steps`` while each segment shrinks.

    python benchmarks/bench_step_timer.py [--steps 20] [--rounds 5] [--batch 256] [--accum 32] [--device auto]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import statistics
import time
from collections.abc import Iterator

import torch

from compress.config import TrainConfig
from compress.models import load_model
from compress.precision import resolve_device, resolve_precision
from compress.registry import LOSSES, SCHEDULES
from compress.step_timer import StepTimer
from compress.teacher import OnlineTeacher, freeze
from compress.train import LossTerm, Trainer


class NoTimer(StepTimer):
    """The timer's interface doing nothing: the loop as it was before the timer."""

    @contextlib.contextmanager
    def host(self, phase: str) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def device(self, phase: str) -> Iterator[None]:
        yield

    def end_step(self) -> None:
        pass


def steps_per_s(student, teacher, batch, steps: int, accum: int, precision, timed: bool) -> tuple[float, int]:
    """Steps per second of ``steps`` steps, and the timed segments of one step."""
    cfg = TrainConfig(steps=steps, batch_size=len(batch["images"]) * accum, accum_steps=accum, lr=1e-4,
                      progress=False, log_every=10**9, precision=precision.name)
    losses = [LossTerm("affinity", 1.0, LOSSES.build({"name": "affinity", "scale": 50}))]
    trainer = Trainer(cfg, student, losses, SCHEDULES.build("constant", context={"base_value": 1e-4}),
                      itertools.repeat(batch), precision, teacher=OnlineTeacher(teacher, precision))
    if not timed:
        trainer.timer = NoTimer(precision.device)
    segments = [0]
    device, end_step = trainer.timer.device, trainer.timer.end_step

    def counted_device(phase: str):  # counts the segments of a step, on any device
        segments[-1] += 1
        return device(phase)

    def counted_end_step() -> None:
        segments.append(0)
        end_step()

    trainer.timer.device, trainer.timer.end_step = counted_device, counted_end_step
    start = time.perf_counter()
    trainer.fit()
    if precision.device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start), max(segments, default=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="cc-demo-teacher")
    parser.add_argument("--student", default="cc-demo-student")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=256, help="samples per step")
    parser.add_argument("--accum", type=int, default=32, help="micro-batches per step")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    precision = resolve_precision("auto", device)
    torch.manual_seed(0)
    teacher = freeze(load_model(args.teacher, device=device))
    base = load_model(args.student, device=device)
    size = base.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    ctx = base.clip_cfg["text_cfg"]["context_length"]
    micro = args.batch // args.accum
    batch = {"images": torch.randn(micro, 3, size, size, device=device),
             "texts": torch.randint(1, 49000, (micro, ctx), device=device)}
    for timed in (False, True):  # warm-up
        steps_per_s(copy.deepcopy(base), teacher, batch, 3, args.accum, precision, timed)
    ratios, plain, timed_rates, segments = [], [], [], 0
    for _ in range(args.rounds):
        p, _ = steps_per_s(copy.deepcopy(base), teacher, batch, args.steps, args.accum, precision, False)
        t, segments = steps_per_s(copy.deepcopy(base), teacher, batch, args.steps, args.accum, precision, True)
        plain.append(p)
        timed_rates.append(t)
        ratios.append(t / p)
    print(f"device {device} precision {precision.name} batch {args.batch} in {args.accum} micro-batches of {micro}; "
          f"student {args.student} teacher {args.teacher}")
    print(f"timed segments per step: {segments} (2 CUDA events each on a GPU, perf_counter on the CPU)")
    print(f"untimed: {statistics.median(plain):.2f} steps/s   timed: {statistics.median(timed_rates):.2f} steps/s")
    print(f"ratio timed / untimed (median of {args.rounds} rounds): {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
