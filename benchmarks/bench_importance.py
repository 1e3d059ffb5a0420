"""Cost of importance scoring (``inheritance: importance``) against its knobs, on a reduced ViT.

The scoring pass of each criterion is timed on a CLIP with ViT-B/32's depth (12 + 12 layers) and
head dim but reduced widths, with calibration micro-batches of ``--batch`` samples:

- the time of 1, 2, 4 and 8 batches: a fixed part (walking the units' groups) plus one forward, and for
  ``taylor`` one backward, of the source per batch; printed is the increment per added batch between 1 and 8
  batches against the increment between 1 and 2: flat (~1) where nothing grows with the batch count;
- ``magnitude`` reads no data: its time is independent of the batches;
- the size of the scores file against the model's width (the scores are one number per head, neuron and
  layer: linear in the model's widths, about 0.25 MB at ViT-B/32).

    python benchmarks/bench_importance.py [--batch 16] [--width 128] [--rounds 3] [--threads N]

Times are the fastest of ``--rounds`` (the better estimate on a shared machine).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from compress.models import build_from_config
from strategies.inheritance.importance_scores import compute_scores


def model_config(width: int) -> dict:
    heads = max(width // 64, 1)
    return {"embed_dim": width // 2,
            "vision_cfg": {"image_size": 64, "patch_size": 16, "width": width, "layers": 12, "head_width": 64},
            "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": width, "heads": heads, "layers": 12}}


def batches(n: int, size: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"images": torch.randn(size, 3, 64, 64, generator=g), "texts": torch.randint(1, 1000, (size, 16),
                                                                                            generator=g)}
            for _ in range(n)]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_from_config(model_config(args.width))
    towers = ("vision", "text")
    data = {n: batches(n, args.batch) for n in (1, 2, 4, 8)}
    compute_scores("taylor", model, towers, data[1], torch.device("cpu"))  # warm-up
    print(f"reduced ViT: 12 + 12 layers, width {args.width}, calibration micro-batch {args.batch}, "
          f"{torch.get_num_threads()} threads")
    for criterion in ("taylor", "activation", "magnitude"):
        total = {n: min(timed(lambda n=n, c=criterion: compute_scores(c, model, towers, data[n], torch.device("cpu")))
                        for _ in range(args.rounds)) for n in (1, 2, 4, 8)}
        text = "  ".join(f"{n}: {total[n] * 1000:.0f} ms" for n in total)
        if criterion == "magnitude":
            print(f"{criterion:10s} total (reads no data) {text}   8 vs 1: {total[8] / total[1]:.2f}")
            continue
        first, later = total[2] - total[1], (total[8] - total[1]) / 7
        print(f"{criterion:10s} total {text}   per added batch, 1->8 vs 1->2: {later / first:.2f} "
              f"({later * 1000:.0f} ms vs {first * 1000:.0f} ms)")
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {}
        for width in (64, 128, 256):
            model = build_from_config(model_config(width))
            scores = compute_scores("magnitude", model, towers, [], torch.device("cpu"))
            path = Path(tmp) / f"{width}.safetensors"
            save_file({k: v.contiguous() for k, v in scores.items()}, str(path))
            sizes[width] = path.stat().st_size
        text = "  ".join(f"{w}: {b} ({b / sizes[64]:.2f}x)" for w, b in sizes.items())
        print(f"scores file bytes vs width -> {text}")


if __name__ == "__main__":
    main()
