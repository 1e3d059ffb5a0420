"""The one place that knows about ranks: the process group, who writes, gathering for losses.

:func:`environment` is the one resolver of a multi-process launch: torchrun's variables
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``; a submitit job
exports them with ``submitit.helpers.TorchDistributedEnvironment``) or, inside an ``srun``
step, SLURM's (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``). :func:`process_group`
joins the group for a run (NCCL on GPUs, gloo on CPU) and tears it down at the end.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


class DistributedError(RuntimeError):
    """The launch environment does not describe a usable process group."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a launch: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise DistributedError(f"environment variable {key}={env[key]!r} is not an integer") from None


def environment(env: Mapping[str, str] | None = None) -> DistEnv:
    """The launch this process belongs to, from torchrun's variables or an ``srun`` step's; one process
    when neither says more (an ``sbatch`` script itself, outside ``srun``, is one process)."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env and "RANK" in env:
        world, rank = _int(env, "WORLD_SIZE"), _int(env, "RANK")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
        if world > 1 and missing:
            raise DistributedError(f"WORLD_SIZE={world} but {' and '.join(missing)} not set (launch with torchrun)")
        addr, port = env.get("MASTER_ADDR", "127.0.0.1"), _int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500
    elif "SLURM_STEP_ID" in env and "SLURM_NTASKS" in env and _int(env, "SLURM_NTASKS") > 1:
        world, rank, local = _int(env, "SLURM_NTASKS"), _int(env, "SLURM_PROCID"), _int(env, "SLURM_LOCALID")
        addr = env.get("MASTER_ADDR") or env.get("SLURM_LAUNCH_NODE_IPADDR")
        if not addr:
            raise DistributedError("an srun step of several tasks without MASTER_ADDR or SLURM_LAUNCH_NODE_IPADDR")
        job = _int(env, "SLURM_JOB_ID") if "SLURM_JOB_ID" in env else 0
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else 20000 + job % 20000
    else:
        return DistEnv()
    if world < 1 or not 0 <= rank < world or local < 0:
        raise DistributedError(f"rank {rank} of world size {world} (local rank {local}) is not a valid launch")
    return DistEnv(rank, world, local, addr, port)


#: how long a collective waits for the other ranks (rank 0 evaluates while the others wait)
TIMEOUT = datetime.timedelta(hours=2)


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo for CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def local_device(device: torch.device, env: DistEnv | None = None) -> torch.device:
    """``cuda`` becomes ``cuda:LOCAL_RANK`` (one GPU per process); other devices are kept."""
    env = environment() if env is None else env
    if device.type == "cuda" and device.index is None and env.world_size > 1:
        return torch.device("cuda", env.local_rank)
    return device


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[DistEnv]:
    """Join the launch's process group for the block (nothing for one process, or when the caller
    already joined one) and leave it at the end."""
    env = environment()
    if is_distributed():
        yield DistEnv(rank(), world_size(), local_rank())
        return
    if env.world_size == 1:
        yield env
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend_for(device), init_method=f"tcp://{env.master_addr}:{env.master_port}", rank=env.rank,
        world_size=env.world_size, timeout=TIMEOUT,
    )
    try:
        yield env
    finally:
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def local_rank() -> int:
    return environment().local_rank


def sum_over_ranks(tensor: Tensor) -> Tensor:
    """The sum of ``tensor`` over ranks, on ``tensor``'s device (a copy; ``tensor`` itself on one process).
    A CPU tensor travels through the GPU under NCCL, which reduces CUDA tensors only."""
    if not is_distributed():
        return tensor
    device = tensor.device
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    out = tensor.detach().to(device, copy=True)
    dist.all_reduce(out)
    return out.to(tensor.device)


def broadcast_from_main(tensors: list[Tensor]) -> None:
    """Overwrite ``tensors`` (in place) with rank 0's values; nothing to do on one process.
    CPU tensors travel through the GPU under NCCL."""
    if not is_distributed() or not tensors:
        return
    for tensor in tensors:
        if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
            staged = tensor.to(torch.device("cuda", torch.cuda.current_device()))
            dist.broadcast(staged, src=0)
            tensor.copy_(staged)
        else:
            dist.broadcast(tensor, src=0)


def mean_over_ranks(tensor: Tensor) -> Tensor:
    """The mean of ``tensor`` over ranks (a copy; ``tensor`` itself on one process)."""
    return sum_over_ranks(tensor) / world_size() if is_distributed() else tensor


def gather_objects(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank 0 (None on the others); ``[obj]`` on one process."""
    if not is_distributed():
        return [obj]
    parts: list[Any] | None = [None] * world_size() if is_main_process() else None
    dist.gather_object(obj, parts, dst=0)
    return parts


#: what a process writes into the run directory when it fails (rank 0 names it in the row)
FAILURE_FILE = ".rank-{rank}.error"


def record_failure(folder: Path, error: BaseException) -> None:
    """A rank other than 0 that fails leaves its error in ``folder`` before it leaves the group: rank 0,
    whose collectives then fail with a lost connection, reports the cause (:func:`failure_with_causes`)."""
    if is_main_process() or world_size() == 1:
        return
    try:
        (folder / FAILURE_FILE.format(rank=rank())).write_text(f"{type(error).__name__}: {error}")
    except OSError:  # the row still says that this rank's peer failed
        pass


def clear_failures(folder: Path) -> None:
    for path in folder.glob(FAILURE_FILE.format(rank="*")):
        path.unlink(missing_ok=True)


def failure_with_causes(folder: Path, error: BaseException, wait_s: float = 2.0) -> BaseException:
    """Rank 0's error, with the errors other ranks recorded (:func:`record_failure`) put first: when a
    rank fails, the others only see a broken collective. ``error`` itself when no other rank failed."""
    if world_size() == 1:
        return error
    deadline = time.monotonic() + wait_s  # the failing rank writes before it leaves: a moment at most
    while True:
        found = sorted(folder.glob(FAILURE_FILE.format(rank="*")))
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if not found:
        return error
    causes = "; ".join(f"rank {p.name.split('.')[1].removeprefix('rank-')} failed: {p.read_text().strip()}"
                       for p in found)
    return DistributedError(f"{causes} (rank 0: {type(error).__name__}: {error})")


#: how long a rank waits for a file rank 0 wrote to appear on its node (NFS caches a negative lookup for up to
#: ``acdirmax``, 60 s by default: twice that)
SHARED_FILE_WAIT_S = 120.0


def wait_for_shared_file(path: Path, timeout_s: float | None = None, poll_s: float = 0.5) -> bool:
    """Whether ``path`` (written by rank 0 before a barrier) is visible here within ``timeout_s`` (default
    :data:`SHARED_FILE_WAIT_S`): on a shared file system another node may see it only after its directory cache
    expires, so the parent folder is listed again every ``poll_s`` (a listing revalidates it). No wait where it is
    there already (one node, a local disk)."""
    deadline = time.monotonic() + (SHARED_FILE_WAIT_S if timeout_s is None else timeout_s)
    while True:
        with contextlib.suppress(OSError):
            if path.name in os.listdir(path.parent) and path.is_file():
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)


def wait_for_main_files(folder: Path) -> None:
    """After rank 0 wrote ``folder`` (and every rank passed a barrier): the other ranks wait until each file rank 0
    sees there is visible on their node (:func:`wait_for_shared_file`), else raise naming the first missing one."""
    if not is_distributed():
        return
    names = [sorted(p.name for p in folder.iterdir() if p.is_file()) if is_main_process() and folder.is_dir() else None]
    dist.broadcast_object_list(names, src=0)
    for name in names[0] or []:
        if not wait_for_shared_file(folder / name):
            raise DistributedError(f"{folder / name}, written by rank 0, is not visible on rank {rank()} after "
                                   f"{SHARED_FILE_WAIT_S:.0f} s: the run directory must be shared by all ranks")


def main_first(action: Callable[[], None]) -> None:
    """Rank 0 runs ``action`` while the others wait; if it fails, every rank raises (rank 0 its own
    error, the others a :class:`DistributedError` naming it), so no rank is left waiting."""
    error: BaseException | None = None
    if is_main_process():
        try:
            action()
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the others were told
            error = e
    if is_distributed():
        message = [f"{type(error).__name__}: {error}" if error is not None else None]
        dist.broadcast_object_list(message, src=0)
        if message[0] is not None and error is None:
            raise DistributedError(f"rank 0 failed: {message[0]}")
    if error is not None:
        raise error


def is_main_process() -> bool:
    """The rank that writes files, logs and progress bars."""
    return rank() == 0


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns each rank its slice of the summed gradient."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # type: ignore[override]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        start = local_row_offset(n)
        return grad[start : start + n]


def gather_with_grad(tensor: Tensor) -> Tensor:
    """All rows of every rank, differentiable w.r.t. this rank's rows; identity on one process.

    Losses use it to compare their local rows against the global columns
    (as open_clip's ``gather_features(..., gather_with_grad=True)``)."""
    if not is_distributed() or world_size() == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)


def gather_no_grad(tensor: Tensor) -> Tensor:
    """All rows of every rank without gradient (teacher features); identity on one process."""
    if not is_distributed() or world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def local_row_offset(local_batch: int) -> int:
    """Index of this rank's first row in the gathered batch."""
    return rank() * local_batch
