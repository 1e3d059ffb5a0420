"""Per-sample augmentation seeding: the CPU generator alone vs ``fork_rng`` + ``torch.manual_seed``.

Each training sample's random crop is drawn from torch's CPU generator seeded by the sample's key
(:func:`compress.data.robust.torch_seeded`). Until issue 16 that was ``torch.random.fork_rng(devices=[])``
+ ``torch.manual_seed``, which also seeds every accelerator's generators: on a CUDA build of torch whose
CUDA was never started that queues a lazy call with a formatted stack trace for each sample. This
script measures, in one process and interleaved in rounds (medians reported), against that old way:

1. microseconds per seeding (an empty block), old / new;
2. the demo's training loader (``clip-compress demo``: synthetic shapes, its sample count and batch,
   the demo teacher/student's transform, ``num_workers: 0``) in batches/s, new / old;
3. distillation steps/s (``cc-demo-teacher`` -> ``cc-demo-student``, affinity loss, the real
   ``Trainer``) fed by that loader, with the new and the old seeding, against the same steps fed a
   pre-made batch (no data cost): the data pipeline's share of a demo step.

    python benchmarks/bench_sample_seeding.py [--quick] [--batches 6] [--steps 6] [--rounds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from compress.config import RunConfig
from compress.data import sampling as sampling_module
from compress.data import shards as shards_module
from compress.data.pipeline import train_batches
from compress.data.robust import torch_seeded
from compress.models import load_model
from compress.precision import resolve_precision
from compress.recipe import config_from_dict
from compress.registry import LOSSES, SCHEDULES
from compress.teacher import OnlineTeacher, freeze
from compress.train import LossTerm, Trainer
from experiments.demo import FULL, QUICK, STUDENT_MODEL, TEACHER_MODEL, DemoPlan, _common


@contextmanager
def old_torch_seeded(seed: int) -> Iterator[None]:
    """The per-sample seeding before issue 16 (the baseline)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed % (1 << 64))
        yield


SEEDINGS: dict[str, Callable[[int], Any]] = {"old": old_torch_seeded, "new": torch_seeded}


def use_seeding(name: str) -> None:
    """Make the data path seed its samples the ``name`` way."""
    sampling_module.torch_seeded = shards_module.torch_seeded = SEEDINGS[name]  # type: ignore[attr-defined]


def us_per_seeding(name: str, calls: int) -> float:
    seeded = SEEDINGS[name]
    start = time.perf_counter()
    for i in range(calls):
        with seeded((3 * 1_000_003 + 1) * 1_000_000_007 + i):
            pass
    return (time.perf_counter() - start) / calls * 1e6


def demo_config(plan: DemoPlan, out_dir: Path) -> RunConfig:
    """A demo student run's config (its data, batch and models, random weights: the speed is the same;
    the affinity loss, no inheritance)."""
    data = _common(plan, plan.student_steps, plan.student_lr, out_dir)
    data.update(name="bench-seeding", teacher={"model": TEACHER_MODEL, "random_init": True},
                student={"model": STUDENT_MODEL}, inheritance={"name": "none"},
                losses=[{"name": "affinity", "weight": 1.0, "scale": 50}])
    return config_from_dict(data)


def loader_batches_per_s(cfg: RunConfig, student: Any, teacher: Any, batches: int) -> float:
    """A fresh loader (as each demo run builds one: images rendered on first use), ``batches`` batches."""
    stream, _ = train_batches(cfg, student, teacher, torch.device("cpu"))
    start = time.perf_counter()
    for _ in itertools.islice(stream, batches):
        pass
    return batches / (time.perf_counter() - start)


def steps_per_s(cfg: RunConfig, student: Any, teacher: Any, batches: Iterator[dict[str, Any]], steps: int) -> float:
    """``steps`` distillation steps of the real Trainer on ``batches`` (CPU, fp32)."""
    precision = resolve_precision("fp32", torch.device("cpu"))
    train = dataclasses.replace(cfg.train, steps=steps, progress=False, log_every=10**9)
    losses = [LossTerm("affinity", 1.0, LOSSES.build({"name": "affinity", "scale": 50}))]
    lr = SCHEDULES.build("constant", context={"base_value": cfg.train.lr})
    trainer = Trainer(train, student, losses, lr, batches, precision, teacher=OnlineTeacher(teacher, precision))
    start = time.perf_counter()
    trainer.fit()
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the quick demo's sizes (batch 64) instead of the full")
    parser.add_argument("--calls", type=int, default=20_000, help="seedings per round (part 1)")
    parser.add_argument("--batches", type=int, default=6, help="loader batches per round (part 2)")
    parser.add_argument("--steps", type=int, default=6, help="training steps per round (part 3)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda}, CUDA started: "
          f"{torch.cuda.is_initialized()}), {torch.get_num_threads()} threads; demo batch {plan.batch_size}")

    us: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(args.rounds):
        for name in us:
            us[name].append(us_per_seeding(name, args.calls))
    old_us, new_us = statistics.median(us["old"]), statistics.median(us["new"])
    print(f"1. seeding: old {old_us:.1f} us/call, new {new_us:.2f} us/call, old / new {old_us / new_us:.1f}x")

    torch.manual_seed(0)
    teacher = freeze(load_model(TEACHER_MODEL))
    student = load_model(STUDENT_MODEL)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = demo_config(plan, Path(tmp))
        use_seeding("new")
        premade = next(train_batches(cfg, student, teacher, torch.device("cpu"))[0])
        loads: dict[str, list[float]] = {"old": [], "new": []}
        steps: dict[str, list[float]] = {"pre-made batch": [], "loader, old seeding": [], "loader, new seeding": []}
        steps_per_s(cfg, student, teacher, itertools.repeat(premade), 2)  # warm-up
        for _ in range(args.rounds):
            for name in ("old", "new"):
                use_seeding(name)
                loads[name].append(loader_batches_per_s(cfg, student, teacher, args.batches))
                stream = train_batches(cfg, student, teacher, torch.device("cpu"))[0]
                steps[f"loader, {name} seeding"].append(steps_per_s(cfg, student, teacher, stream, args.steps))
            steps["pre-made batch"].append(steps_per_s(cfg, student, teacher, itertools.repeat(premade), args.steps))
        use_seeding("new")
    old_b, new_b = statistics.median(loads["old"]), statistics.median(loads["new"])
    print(f"2. demo loader: old {old_b:.2f} batches/s ({1e3 / old_b:.0f} ms/batch), new {new_b:.2f} batches/s "
          f"({1e3 / new_b:.0f} ms/batch), new / old {new_b / old_b:.2f}")
    base = statistics.median(steps["pre-made batch"])
    print("3. demo training steps/s (median of rounds; ratio against the pre-made batch):")
    for name, values in steps.items():
        print(f"   {name:22s} {statistics.median(values):6.2f} steps/s   ratio {statistics.median(values) / base:.2f}")
    new_s, old_s = statistics.median(steps["loader, new seeding"]), statistics.median(steps["loader, old seeding"])
    print(f"   new / old seeding: {new_s / old_s:.2f}")


if __name__ == "__main__":
    main()
