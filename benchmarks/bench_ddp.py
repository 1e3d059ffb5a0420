"""Data-parallel scaling: N processes (DDP, gloo on CPU / NCCL on GPUs) against one process at the same
global batch, with the framework's Trainer (affinity loss, gathered features, AdamW).

Prints samples/s of both and the ratio N processes / one process. On CPU the processes share the
machine's cores: the baseline gets all of them as threads (``--threads``, default the core count) and
each of the N processes ``threads / N``, so the ratio is what DDP costs or gains on the same
hardware. On GPUs each process gets its own GPU and the baseline one GPU: the ideal is N.

    python benchmarks/bench_ddp.py [--procs 2] [--batch 64] [--steps 10] [--rounds 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from compress.config import TrainConfig
from compress.models import load_model
from compress.models.forward import context_length_of, image_size_of
from compress.precision import resolve_device, resolve_precision
from compress.registry import LOSSES, SCHEDULES
from compress.teacher import OnlineTeacher, freeze
from compress.train import LossTerm, Trainer


def samples_per_s(args: argparse.Namespace, device: torch.device, batch_size: int, world: int) -> list[float]:
    """Global samples/s of each round (``world`` ranks with ``batch_size / world`` samples each)."""
    precision = resolve_precision("auto", device)
    torch.manual_seed(0)
    teacher = freeze(load_model(args.teacher, device=device))
    probe = load_model(args.student)
    local, size = batch_size // world, image_size_of(probe)
    batch = {"images": torch.randn(local, 3, size, size, device=device),
             "texts": torch.randint(1, 49000, (local, context_length_of(probe)), device=device)}
    rates = []
    for steps in [2] + [args.steps] * args.rounds:  # the first round warms up
        torch.manual_seed(0)
        student = load_model(args.student, device=device)  # a fresh student (and DDP) per round
        cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=1e-4, progress=False, log_every=10**9,
                          precision=precision.name)
        losses = [LossTerm("affinity", 1.0, LOSSES.build({"name": "affinity", "scale": 50}))]
        trainer = Trainer(cfg, student, losses, SCHEDULES.build("constant", context={"base_value": 1e-4}),
                          itertools.repeat(batch), precision, teacher=OnlineTeacher(teacher, precision))
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        trainer.fit()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if world > 1:
            dist.barrier()
        rates.append(steps * batch_size / (time.perf_counter() - start))
    return rates[1:]


def rank_main(rank: int, args: argparse.Namespace, port: int, out: dict) -> None:
    device = resolve_device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    torch.set_num_threads(max(args.threads // args.procs, 1))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=args.procs)
    try:
        rates = samples_per_s(args, device, args.batch, args.procs)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        out["rates"] = rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="cc-demo-teacher")
    parser.add_argument("--student", default="cc-demo-student")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64, help="the global batch")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads in all")
    args = parser.parse_args()
    if args.batch % args.procs:
        parser.error(f"--batch {args.batch} must be a multiple of --procs {args.procs}")
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    one = samples_per_s(args, device, args.batch, 1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(rank_main, args=(args, port, out), nprocs=args.procs, join=True)
        many = list(out["rates"])
    print("rounds, 1 process:", [round(r, 1) for r in one], " N processes:", [round(r, 1) for r in many])
    ratio = statistics.median(many) / statistics.median(one)
    print(f"device {device} global batch {args.batch} student {args.student} teacher {args.teacher} "
          f"threads {args.threads}")
    print(f"1 process: {statistics.median(one):.1f} samples/s   {args.procs} processes: "
          f"{statistics.median(many):.1f} samples/s")
    print(f"ratio {args.procs} processes / 1 process (median of {args.rounds} rounds): {ratio:.3f}")


if __name__ == "__main__":
    main()
