"""The one place that knows about ranks: who writes, and gathering features for losses."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


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
        return grad[rank() * n : (rank() + 1) * n]


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
