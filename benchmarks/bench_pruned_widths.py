"""Inference speed of automatically pruned widths vs a uniform student of the same size.

A ViT-B/32 (random weights) is pruned three ways, as automatic inheritance leaves it: (a) ragged
widths as the masks give them (vision residual 376, text residual 285, per-layer heads and MLP
widths that are multiples of nothing); (b) the same with ``round_to`` 8 and (c) with 64 (residual
and MLP widths moved to the nearest multiple by :func:`compress.masks.gates.round_kept`, the rule the
masks use); (d) a uniform student (residual a multiple of 64, the same heads and MLP width in every
layer) with about the same parameters and MACs per tower. Forward passes of each tower are
interleaved in rounds; printed are the throughput ratios against (d): the median of the per-round
ratios, the ratio of the fastest rounds (the better estimate on a shared machine), and the
median per MAC (throughput x MACs: work done per second, fair where rounding moved the size).

    python benchmarks/bench_pruned_widths.py [--batch 8] [--text-batch 32] [--rounds 9] [--iters 1] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from compress.evaluation.efficiency import count_macs
from compress.masks.gates import round_kept
from compress.models import build_from_config, get_model_config
from compress.models.params import parameter_report
from compress.models.structure import TowerKeep, prune_model

#: ViT-B/32's towers: (layers, width, heads, head dim, MLP width)
FULL = {"vision": (12, 768, 12, 64, 3072), "text": (12, 512, 8, 64, 2048)}
#: an automatically pruned student (about a quarter of ViT-B/32's prunable parameters kept: vision 20.3M + text
#: 10.2M of 126M, like the last stage of the 3-stage chain): (width, heads, MLP widths)
PRUNED = {
    "vision": (376, [12, 9, 8, 7, 7, 6, 6, 5, 5, 4, 4, 3],
               [1717, 1563, 1499, 1402, 1371, 1290, 1233, 1187, 1093, 1021, 917, 1105]),
    "text": (285, [8, 6, 6, 5, 5, 4, 4, 4, 3, 3, 2, 2],
             [1309, 1175, 1101, 1057, 989, 943, 881, 837, 765, 701, 613, 577]),
}


def rounded(structure: dict, round_to: int) -> dict:
    """Residual and MLP widths of ``structure`` moved to the nearest multiple (heads untouched)."""
    out = {}
    for name, (width, heads, mlp) in structure.items():
        _, full_width, _, _, full_mlp = FULL[name]
        out[name] = (round_kept(width, full_width, round_to), heads, [round_kept(f, full_mlp, round_to) for f in mlp])
    return out


def tower_params(width: int, heads: list[int], mlp: list[int], head_dim: int = 64) -> int:
    """Block parameters: qkv + out projection, MLP, two LayerNorms (the embeddings aside)."""
    return sum(4 * width * h * head_dim + 3 * h * head_dim + width + 2 * width * f + f + width + 4 * width
               for h, f in zip(heads, mlp, strict=True))


def uniform_like(structure: dict) -> dict:
    """A uniform structure per tower: width a multiple of 64, equal heads, and the MLP width (a
    multiple of 64) that makes the block parameters closest to ``structure``'s."""
    out = {}
    for name, (width, heads, mlp) in structure.items():
        layers = len(heads)
        w = round(width / 64) * 64
        h = max(1, round(sum(heads) / layers))
        target = tower_params(width, heads, mlp)
        widths = range(64, FULL[name][4] + 1, 64)
        f = min(widths, key=lambda f: abs(tower_params(w, [h] * layers, [f] * layers) - target))
        out[name] = (w, [h] * layers, [f] * layers)
    return out


def build(structure: dict) -> nn.Module:
    """A random ViT-B/32 pruned to ``structure`` by :func:`prune_model` (the keep path of the masks)."""
    model = build_from_config(get_model_config("ViT-B-32"))
    keep = {
        name: TowerKeep(channels=torch.arange(width), heads=[torch.arange(h) for h in heads],
                        neurons=[torch.arange(f) for f in mlp])
        for name, (width, heads, mlp) in structure.items()
    }
    return prune_model(model, keep).eval()


def timed(fn: Callable[[], object], iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="images per forward (224x224)")
    parser.add_argument("--text-batch", type=int, default=32, help="texts per forward (77 tokens)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--iters", type=int, default=1, help="forwards per model and round")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    structures = {"pruned": PRUNED, "round_to 8": rounded(PRUNED, 8), "round_to 64": rounded(PRUNED, 64),
                  "uniform": uniform_like(PRUNED)}
    models = {label: build(s) for label, s in structures.items()}
    images = torch.randn(args.batch, 3, 224, 224)
    texts = torch.randint(1, 49406, (args.text_batch, 77))
    texts[:, -1] = 49407
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, "
          f"{args.batch} images / {args.text_batch} texts per forward, {args.rounds} rounds x {args.iters}")
    macs = {label: count_macs(model) for label, model in models.items()}
    for label, s in structures.items():
        report = parameter_report(models[label])
        print(f"  {label:12s} vision width {s['vision'][0]}, MLP {s['vision'][2]}; text width {s['text'][0]}, "
              f"MLP {s['text'][2]}; params vision {report['vision'] / 1e6:.2f}M text {report['text'] / 1e6:.2f}M; "
              f"MACs image {macs[label]['macs_image'] / 1e9:.3f}G text {macs[label]['macs_text'] / 1e9:.3f}G")
    times: dict[tuple[str, str], list[float]] = {}
    with torch.inference_mode():
        for model in models.values():  # warm-up
            model.encode_image(images), model.encode_text(texts)
        labels = list(models)
        for r in range(args.rounds):
            order = labels[r % len(labels):] + labels[:r % len(labels)]  # rotate who goes first
            for tower, x in (("image", images), ("text", texts)):
                for label in order:
                    encode = getattr(models[label], f"encode_{tower}")
                    times.setdefault((label, tower), []).append(timed(lambda e=encode, x=x: e(x), args.iters))
    print("\n| model | image vs uniform | fastest | per MAC | text vs uniform | fastest | per MAC |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label in models:
        cells = []
        for tower in ("image", "text"):
            mine, base = times[(label, tower)], times[("uniform", tower)]
            ratio = statistics.median(b / m for m, b in zip(mine, base, strict=True))  # throughput: 1 / time
            macs_ratio = macs[label][f"macs_{tower}"] / macs["uniform"][f"macs_{tower}"]
            cells += [f"{ratio:.3f}", f"{min(base) / min(mine):.3f}", f"{ratio * macs_ratio:.3f}"]
        print(f"| {label} | " + " | ".join(cells) + " |")

if __name__ == "__main__":
    main()
