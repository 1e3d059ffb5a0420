"""Training steps from the teacher-output cache against the same steps with the teacher online.

The distillation step with an online teacher spends part of its time in the teacher's forward; the cache removes it.
The best a cache can do is the ceiling: the step with the teacher's outputs handed back from memory at no cost
(``t_online / t_ideal``; the estimate ``t_online / (t_online - t_teacher)`` from the teacher's forward timed alone is
printed beside it); the script reports the cached run's speed-up and its share of that ceiling (goal: >= 90%).
The trainers run in this process on the same micro-batches, read beforehand from the real loaders (fixed views: the
online run's with the teacher's view, the cached run's with the cache's outputs), interleaved in rounds (median
reported). It also generates the cache and reports its time and size per 1000 samples, and how long the
loader takes to make a batch in each mode (``--workers`` 0: in this process).

    python benchmarks/bench_teacher_cache.py [--teacher ViT-B-32] [--student TinyCLIP-ViT-40M-32-Text-19M]
        [--batch 32] [--steps 3] [--rounds 3] [--samples 256] [--augmentations 2] [--dtype fp16]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import shutil
import statistics
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from compress.data.pipeline import train_batches
from compress.models import load_model
from compress.precision import resolve_device, resolve_precision
from compress.recipe import Recipe, config_from_dict
from compress.teacher import OnlineTeacher, load_teachers
from compress.teacher_cache.generate import generate
from compress.teacher_cache.identity import cache_root
from compress.teacher_cache.store import CacheStore
from compress.train import Trainer


def config(args: argparse.Namespace, mode: str, folder: Path) -> Any:
    return config_from_dict({
        "name": f"bench-{mode}",
        "teacher": {"model": args.teacher, "random_init": True},
        "student": {"model": args.student},
        "inheritance": {"name": "none"},
        "losses": [{"name": "affinity"}],
        "data": {"train": {"kind": "synthetic", "num_samples": args.samples}, "num_workers": args.workers},
        "train": {"steps": args.steps, "batch_size": args.batch, "progress": False, "log_every": 10**6,
                  "checkpoint_every": 0, "device": args.device},
        "teacher_cache": {"mode": mode, "dir": str(folder), "num_augmentations": args.augmentations,
                          "dtype": args.dtype},
        "output": {"dir": str(folder / "runs"), "save_checkpoint": False},
    })


def read_batches(cfg: Any, student: Any, teacher: Any, store: Any, count: int) -> tuple[list[dict], float]:
    """``count`` micro-batches of the run's loader, and the seconds it took per batch."""
    stream, _ = train_batches(cfg, student, teacher, torch.device("cpu"), store)
    next(stream)  # workers started, first batch made
    start = time.perf_counter()
    batches = list(islice(stream, count))
    return batches, (time.perf_counter() - start) / count


def steps_per_s(cfg: Any, student: Any, batches: list[dict], source: Any, precision: Any) -> float:
    losses = Recipe.losses(cfg, student, None)
    train = dataclasses.replace(cfg.train, steps=len(batches))
    trainer = Trainer(train, student, losses, Recipe.schedule(cfg, "lr"), iter(batches), precision, teacher=source)
    start = time.perf_counter()
    trainer.fit()
    return len(batches) / (time.perf_counter() - start)


class InMemoryTeacher:
    """The ideal cache: the teacher's outputs of each batch computed beforehand and handed back from memory (what
    training would cost if reading the teacher's outputs cost nothing: the ceiling)."""

    def __init__(self, source: OnlineTeacher, batches: list[dict]) -> None:
        self.outputs = {id(b["images"]): source(b) for b in batches}
        self.order = [id(b["images"]) for b in batches]
        self.calls = 0

    def __call__(self, batch: dict) -> Any:
        out = self.outputs[self.order[self.calls % len(self.order)]]
        self.calls += 1
        return out


def teacher_seconds(source: OnlineTeacher, batches: list[dict]) -> float:
    start = time.perf_counter()
    for batch in batches:
        source(batch)
    return (time.perf_counter() - start) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="ViT-B-32")
    parser.add_argument("--student", default="TinyCLIP-ViT-40M-32-Text-19M")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--augmentations", type=int, default=2)
    parser.add_argument("--dtype", default="fp16")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-teacher-cache-"))
    try:
        run(args, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run(args: argparse.Namespace, folder: Path) -> None:
    device = resolve_device(args.device)
    precision = resolve_precision("auto", device)
    online_cfg, cached_cfg = config(args, "online", folder), config(args, "cache", folder)
    start = time.perf_counter()
    generate(cached_cfg, progress=False)
    generation = time.perf_counter() - start
    root = cache_root(cached_cfg)
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    store = CacheStore(root)
    teacher = load_teachers(cached_cfg)[0]
    base = load_model(args.student)
    online_batches, online_load = read_batches(online_cfg, base, teacher, None, args.steps)
    cached_batches, cached_load = read_batches(cached_cfg, base, None, store, args.steps)
    online_source = OnlineTeacher(teacher, precision)
    cached_source = Recipe.teacher_source(cached_cfg, None, precision, set(), store)
    steps_per_s(online_cfg, copy.deepcopy(base), online_batches[:1], online_source, precision)  # warm-up
    steps_per_s(cached_cfg, copy.deepcopy(base), cached_batches[:1], cached_source, precision)
    teacher_s = statistics.median(teacher_seconds(online_source, online_batches) for _ in range(args.rounds))
    online, cached, ideal = [], [], []
    for _ in range(args.rounds):
        online.append(steps_per_s(online_cfg, copy.deepcopy(base), online_batches, online_source, precision))
        cached.append(steps_per_s(cached_cfg, copy.deepcopy(base), cached_batches, cached_source, precision))
        free = InMemoryTeacher(online_source, online_batches)
        ideal.append(steps_per_s(online_cfg, copy.deepcopy(base), online_batches, free, precision))
    t_online = 1 / statistics.median(online)
    ceiling = statistics.median(ideal) / statistics.median(online)
    share_estimate = t_online / (t_online - teacher_s)
    speedup = statistics.median(cached) / statistics.median(online)
    print(f"device {device} precision {precision.name} batch {args.batch} teacher {args.teacher} student "
          f"{args.student} (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    print(f"cache: {args.samples} samples x {args.augmentations} views, {args.dtype}: generated in {generation:.1f} s "
          f"= {1000 * generation / args.samples:.0f} s per 1000 samples; {size / 2**20:.2f} MiB = "
          f"{1000 * size / args.samples / 2**20:.2f} MiB per 1000 samples")
    print(f"loader, s per batch of {args.batch}: online views {online_load:.3f}, cached views + outputs "
          f"{cached_load:.3f}")
    print(f"step: online {t_online:.3f} s (teacher {teacher_s:.3f} s = {teacher_s / t_online:.0%}), cached "
          f"{1 / statistics.median(cached):.3f} s (median of {args.rounds} rounds of {args.steps} steps)")
    print(f"in-memory teacher outputs (the ceiling): {1 / statistics.median(ideal):.3f} s a step; from the teacher's "
          f"share alone 1 / (1 - {teacher_s / t_online:.2f}) = {share_estimate:.3f}")
    print(f"speed-up cached / online {speedup:.3f}; ceiling {ceiling:.3f}; the cache reaches {speedup / ceiling:.0%} "
          f"of the ceiling's speed ({(speedup - 1) / (ceiling - 1) if ceiling > 1 else float('nan'):.0%} of its gain)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
