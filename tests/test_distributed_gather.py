"""Two CPU processes (gloo) against one: local rows vs gathered columns give the full-batch loss.

Each rank holds half of a global batch of N pairs and computes its loss over its N/W local rows
against all N columns. Then
- the mean over ranks of the rank losses equals the single-process loss on the full batch;
- rank r's gradient w.r.t. its own features, g_r, is d(sum_r' L_r')/dx_r (the gather's backward
  sums every rank's column gradient into the owner) = W * dL_full/dx_r. DDP averages parameter
  gradients over ranks, so (1/W) sum_r J_r^T g_r = sum_r J_r^T dL_full/dx_r = dL_full/dtheta: the
  training gradient is exactly the single-process one. The test asserts g_r / W == dL_full/dx_r;
- a replicated parameter (the student's logit_scale) gets dL_r/ds on rank r, whose mean over ranks
  (DDP's average) equals dL_full/ds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from compress.outputs import ClipOutput
from compress.registry import LOSSES

WORLD = 2
N, D = 8, 6
CASES: dict[str, dict] = {
    "affinity_fixed": {"name": "affinity", "scale": 50.0, "weight_i2t": 0.3, "weight_t2i": 0.7},
    "affinity_model": {"name": "affinity", "scale": "model"},
    "unimodal_exclude_self": {"name": "unimodal_affinity", "scale": 5.0, "exclude_self": True},
    "clip": {"name": "clip"},
    "feature_distill": {"name": "feature_distill", "metric": "mse"},
    "icl_model": {"name": "icl", "scale": "model", "weight_i2t": 0.3, "weight_t2i": 0.7},
}


def full_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    data = {
        k: F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=-1) for k in ("si", "st", "ti", "tt")
    }
    data["s_scale"] = torch.tensor(12.0, dtype=torch.float64)
    data["t_scale"] = torch.tensor(40.0, dtype=torch.float64)
    return data


def run_case(spec: dict, rows: slice) -> dict[str, torch.Tensor]:
    """Loss and gradients for the rows ``rows`` of the full batch (all of it on one process)."""
    data = full_batch()
    image = data["si"][rows].clone().requires_grad_(True)
    text = data["st"][rows].clone().requires_grad_(True)
    scale = data["s_scale"].clone().requires_grad_(True)
    student = ClipOutput(image, text, scale)
    teacher = ClipOutput(data["ti"][rows], data["tt"][rows], data["t_scale"])
    loss = sum(LOSSES.build(spec)(student, teacher).values())
    loss.backward()  # type: ignore[union-attr]
    zero = torch.zeros((), dtype=torch.float64)
    return {
        "loss": loss.detach(),  # type: ignore[union-attr]
        "image": image.grad,
        "text": text.grad,
        "scale": zero if scale.grad is None else scale.grad,
    }


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        n = N // WORLD
        rows = slice(rank * n, (rank + 1) * n)
        results = {name: run_case(spec, rows) for name, spec in CASES.items()}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict[str, torch.Tensor]]]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    tmp = tmp_path_factory.mktemp("gather")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_match_one_process(case: str, rank_results: list[dict[str, dict[str, torch.Tensor]]]) -> None:
    full = run_case(CASES[case], slice(None))
    ranks = [r[case] for r in rank_results]
    torch.testing.assert_close(sum(r["loss"] for r in ranks) / WORLD, full["loss"], rtol=1e-12, atol=1e-14)
    n = N // WORLD
    for rank, result in enumerate(ranks):
        for key in ("image", "text"):
            expected = full[key][rank * n : (rank + 1) * n]
            torch.testing.assert_close(result[key] / WORLD, expected, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(sum(r["scale"] for r in ranks) / WORLD, full["scale"], rtol=1e-10, atol=1e-13)
    # the ranks really differ (each saw other rows), so the checks above are not vacuous
    assert not torch.allclose(ranks[0]["loss"], ranks[1]["loss"])
