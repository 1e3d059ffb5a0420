"""Training step of a masked student (auto inheritance, sampled masks) vs the plain student.

Same shapes, same batch, same affinity-style loss and AdamW; the masked step also samples the
gates and adds the sparsity Lagrangian. Steps are interleaved (plain, masked, plain, ...) and
the ratio masked / plain of the median and of the fastest step time is printed (goal: <= 1.25);
on a shared machine the fastest steps are the better estimate of the intrinsic cost.

    python benchmarks/bench_masked_step.py [--width 256] [--layers 6] [--batch 16] [--image 64] [--repeats 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from compress.models import build_from_config
from compress.optim import build_adamw, weight_groups
from compress.precision import resolve_device
from compress.registry import INHERITANCE


def config(width: int, layers: int, image: int) -> dict:
    return {
        "embed_dim": 256,
        "vision_cfg": {"image_size": image, "layers": layers, "width": width, "head_width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": width // 2, "heads": 4, "layers": layers // 2},
    }


def affinity(images: torch.Tensor, texts: torch.Tensor, t_images: torch.Tensor, t_texts: torch.Tensor) -> torch.Tensor:
    """TinyCLIP's affinity mimicking at scale 50: soft cross-entropy both ways."""
    s, t = 50 * F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T, 50 * t_images @ t_texts.T
    i2t = -(t.softmax(1) * s.log_softmax(1)).sum(1).mean()
    t2i = -(t.T.softmax(1) * s.T.log_softmax(1)).sum(1).mean()
    return 0.5 * (i2t + t2i)


class Step:
    """One optimizer step of ``model`` on a fixed batch (plus the strategy's regulariser, if any)."""

    def __init__(self, model, batch, targets, strategy=None) -> None:
        self.model, self.batch, self.targets, self.strategy = model.train(), batch, targets, strategy
        own = strategy.param_groups(model) if strategy else []
        skip = {id(p) for g in own for p in g["params"]}
        self.optimizer = build_adamw(weight_groups([("", model)], 0.2, skip) + own, 1e-5, (0.9, 0.98), 1e-6)
        self.step = 0

    def __call__(self) -> float:
        start = time.perf_counter()
        images, texts = self.batch
        loss = affinity(self.model.encode_image(images), self.model.encode_text(texts), *self.targets)
        if self.strategy is not None:
            loss = loss + sum(self.strategy.regularizer(self.model, self.step).values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.strategy is not None:
            self.strategy.on_step(self.model, self.step + 1)
        if images.device.type == "cuda":
            torch.cuda.synchronize()
        self.step += 1
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--image", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    plain = build_from_config(config(args.width, args.layers, args.image)).to(device)
    strategy = INHERITANCE.build({"name": "auto", "prune_step": 10**9})
    masked = strategy.inherit(None, plain)
    batch = (torch.randn(args.batch, 3, args.image, args.image, device=device),
             torch.randint(1, 49406, (args.batch, 32), device=device))
    targets = tuple(F.normalize(torch.randn(args.batch, 256, device=device), dim=-1) for _ in range(2))
    steps = {"plain": Step(plain, batch, targets), "masked": Step(masked, batch, targets, strategy)}
    for step in steps.values():  # warm-up
        step(), step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            times[name].append(step())
    print(f"device {device}, ViT width {args.width} x {args.layers} layers, image {args.image}, batch {args.batch}, "
          f"text width {args.width // 2} x {args.layers // 2}; {args.repeats} interleaved steps each")
    for label, stat in (("median", statistics.median), ("fastest", min)):
        plain_s, masked_s = stat(times["plain"]), stat(times["masked"])
        print(f"{label:>7}: plain step {1000 * plain_s:.1f} ms, masked step {1000 * masked_s:.1f} ms, "
              f"ratio masked / plain {masked_s / plain_s:.3f} (goal <= 1.25)")


if __name__ == "__main__":
    main()
