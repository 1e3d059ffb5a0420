"""Framework distillation step vs a minimal hand-written loop (same models, loss, optimizer, batch).

Prints the throughput ratio framework / hand-written (goal: >= 0.97). Both loops run in this
process, interleaved in rounds, and the median round is reported.

    python benchmarks/bench_train_step.py [--steps 20] [--rounds 5] [--batch 64] [--device auto]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import time

import torch
import torch.nn.functional as F

from compress.config import TrainConfig
from compress.models import load_model
from compress.precision import resolve_device, resolve_precision
from compress.registry import LOSSES, SCHEDULES
from compress.teacher import OnlineTeacher, freeze
from compress.train import LossTerm, Trainer


def hand_written_steps(student, teacher, batch, steps: int, lr: float, dtype) -> float:
    """The loop a researcher would write by hand: TinyCLIP affinity loss, AdamW, clip 5."""
    opt = torch.optim.AdamW(student.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    images, texts = batch["images"], batch["texts"]
    device = images.device
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else torch.autocast(device.type, enabled=False)
    start = time.perf_counter()
    for _ in range(steps):
        with torch.no_grad(), autocast:
            ti = F.normalize(teacher.encode_image(images), dim=-1)
            tt = F.normalize(teacher.encode_text(texts), dim=-1)
        with autocast:
            si = F.normalize(student.encode_image(images), dim=-1)
            st = F.normalize(student.encode_text(texts), dim=-1)
            s_logits, t_logits = 50 * si.float() @ st.float().T, 50 * ti.float() @ tt.float().T
            loss = 0.5 * -(t_logits.softmax(1) * s_logits.log_softmax(1)).sum(1).mean()
            loss = loss + 0.5 * -(t_logits.T.softmax(1) * s_logits.T.log_softmax(1)).sum(1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 5.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def framework_steps(student, teacher, batch, steps: int, lr: float, precision) -> float:
    cfg = TrainConfig(steps=steps, batch_size=len(batch["images"]), lr=lr, progress=False, log_every=10**9,
                      precision=precision.name)
    losses = [LossTerm("affinity", 1.0, LOSSES.build({"name": "affinity", "scale": 50}))]
    trainer = Trainer(cfg, student, losses, SCHEDULES.build("constant", context={"base_value": lr}),
                      itertools.repeat(batch), precision, teacher=OnlineTeacher(teacher, precision))
    start = time.perf_counter()
    trainer.fit()
    if precision.device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="cc-demo-teacher")
    parser.add_argument("--student", default="cc-demo-student")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    precision = resolve_precision("auto", device)
    torch.manual_seed(0)
    teacher = freeze(load_model(args.teacher, device=device))
    base = load_model(args.student, device=device)
    size = base.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    ctx = base.clip_cfg["text_cfg"]["context_length"]
    batch = {"images": torch.randn(args.batch, 3, size, size, device=device),
             "texts": torch.randint(1, 49000, (args.batch, ctx), device=device)}
    # warm-up both paths once
    hand_written_steps(copy.deepcopy(base).train(), teacher, batch, 3, 1e-4, precision.dtype)
    framework_steps(copy.deepcopy(base), teacher, batch, 3, 1e-4, precision)
    ratios, hand, ours = [], [], []
    for _ in range(args.rounds):
        h = hand_written_steps(copy.deepcopy(base).train(), teacher, batch, args.steps, 1e-4, precision.dtype)
        f = framework_steps(copy.deepcopy(base), teacher, batch, args.steps, 1e-4, precision)
        hand.append(h)
        ours.append(f)
        ratios.append(f / h)
    print(f"device {device} precision {precision.name} batch {args.batch} "
          f"student {args.student} teacher {args.teacher}")
    print(f"hand-written: {statistics.median(hand):.2f} steps/s   framework: {statistics.median(ours):.2f} steps/s")
    print(f"ratio framework / hand-written (median of {args.rounds} rounds): {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
