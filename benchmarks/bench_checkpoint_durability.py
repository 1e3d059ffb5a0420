"""What durable checkpoints and stop handling cost.

1. ``write_checkpoint`` of a student of ``--mb`` MiB of fp32 weights (plus AdamW's two moments in the
   state, as in a real checkpoint: 3x the weights) with fsync (files, folders, ``latest``: the code as it
   is) against the same write with ``os.fsync`` replaced by a no-op (the write before fsync was added).
2. The stop flag's per-step all-reduce (one int32, max, over gloo) between two CPU processes, against an
   empty Python call: microseconds per step.

Prints both and the fsync ratio. Run: ``python benchmarks/bench_checkpoint_durability.py --mb 256``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from compress import stopping
from compress.checkpoint import write_checkpoint


class Student(nn.Module):
    """A stand-in with ``mb`` MiB of fp32 weights (``write_checkpoint`` only needs a state dict and a record)."""

    def __init__(self, mb: int) -> None:
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(2**18)) for _ in range(mb))  # 1 MiB each


def checkpoint_times(mb: int, rounds: int, folder: Path) -> dict[str, float]:
    import compress.checkpoint as checkpoint

    student = Student(mb)
    state = {"optimizer": {"exp_avg": [p.detach().clone() for p in student.weights],
                           "exp_avg_sq": [p.detach().clone() for p in student.weights]}}
    checkpoint.student_record = lambda model: {"model_cfg": {}}  # the stand-in has no open_clip config
    real_fsync = os.fsync
    times: dict[str, list[float]] = {"fsync": [], "no fsync": []}
    step = 0
    for _ in range(rounds):
        for mode in times:
            os.fsync = real_fsync if mode == "fsync" else (lambda fd: None)
            step += 1
            start = time.perf_counter()
            write_checkpoint(folder, step, student, state, {"run_id": "bench"})
            times[mode].append(time.perf_counter() - start)
    os.fsync = real_fsync
    return {mode: statistics.median(values) for mode, values in times.items()}


def _allreduce_worker(rank: int, port: int, calls: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    for _ in range(100):
        stopping.agreed()
    start = time.perf_counter()
    for _ in range(calls):
        stopping.agreed()
    per_call = (time.perf_counter() - start) / calls
    if rank == 0:
        Path(out).write_text(str(per_call))
    dist.destroy_process_group()


def allreduce_time(calls: int, folder: Path) -> float:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    out = folder / "allreduce.txt"
    mp.spawn(_allreduce_worker, args=(port, calls, str(out)), nprocs=2)
    return float(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256, help="MiB of student weights (the checkpoint holds ~3x)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        times = checkpoint_times(args.mb, args.rounds, Path(tmp))
        size = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file()) / 2**20
        print(f"checkpoint of {size:.0f} MiB: {times['no fsync']:.3f} s without fsync, {times['fsync']:.3f} s with "
              f"(ratio {times['fsync'] / times['no fsync']:.2f}, +{times['fsync'] - times['no fsync']:.3f} s)")
        per_call = allreduce_time(args.calls, Path(tmp))
        print(f"stop flag all-reduce (2 gloo processes, 4 bytes): {per_call * 1e6:.0f} us per step")


if __name__ == "__main__":
    main()
