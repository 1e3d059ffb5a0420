"""``clip-compress demo``: compress a CLIP on the embedded shapes data set, on a laptop CPU.

1. A small teacher CLIP is trained from scratch with the CLIP loss (cached in the user cache
   folder after the first time).
2. Students with about half of the teacher's prunable parameters are distilled for the same
   number of steps each: (a) from scratch with the CLIP loss, (b) from scratch with affinity
   mimicking, (c) manual weight inheritance + affinity mimicking, (d) automatic weight
   inheritance (learned masks) + affinity mimicking.
3. A table of zero-shot top-1 (all classes, and the colour-shape pairs held out from
   training), retrieval R@1, parameters and throughput is printed and saved.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from compress.config import RunConfig
from compress.fileio import check_output
from compress.recipe import config_from_dict
from experiments.dispatch import dispatch

TEACHER_MODEL = "cc-demo-teacher"
STUDENT_MODEL = "cc-demo-student"


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one version of the demo (full or quick)."""

    teacher_steps: int
    student_steps: int
    batch_size: int
    teacher_lr: float
    student_lr: float
    val_samples: int
    train_samples: int = 25600
    prune_fraction: float = 0.6  # auto inheritance learns masks for this fraction of the steps
    teacher_name: str = "demo-teacher"  # the teacher's run name (its folder in the cache)
    teacher_seed: int = 0  # the teacher's training image set
    teacher_holdout: bool = True  # False: the teacher sees the held-out colour-shape pairs too


FULL = DemoPlan(teacher_steps=1200, student_steps=240, batch_size=128, teacher_lr=2e-3, student_lr=1e-3,
                val_samples=1000)
QUICK = DemoPlan(teacher_steps=250, student_steps=50, batch_size=64, teacher_lr=2e-3, student_lr=1e-3,
                 val_samples=400)
#: the web-like benchmark's teacher (``python -m experiments.ablations --benchmark web``): the demo teacher's
#: architecture and training, on an image set of its own (seed 100) with exact captions and all 40 colour-shape
#: pairs (it has seen more than the students' data, which holds noisy captions and no held-out pair)
WEB_TEACHER = replace(FULL, teacher_name="web-teacher", teacher_seed=100, teacher_holdout=False)

ZERO_SHOT_TASKS = [{"name": "color_shape", "kind": "synthetic", "task": "color_shape"}]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "clip-compress" / "demo"


def _common(plan: DemoPlan, steps: int, lr: float, out_dir: Path) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "schedules": {"lr": {"name": "warmup_cosine", "warmup_steps": max(steps // 10, 1)}},
        "data": {
            "train": {"kind": "synthetic", "seed": 0, "num_samples": plan.train_samples, "options": {"cache": True}},
            "val": {"kind": "synthetic", "seed": 1, "num_samples": plan.val_samples},
        },
        "train": {"steps": steps, "batch_size": plan.batch_size, "lr": lr, "weight_decay": 0.1,
                  "log_every": max(steps // 20, 1)},
        "eval": {"zero_shot": ZERO_SHOT_TASKS, "batch_size": 250},
        "output": {"dir": str(out_dir)},
    }


def teacher_config(plan: DemoPlan, cache_dir: Path) -> RunConfig:
    """The teacher's run (the CLIP loss from scratch); the demo's config is the same as before the plan's teacher
    fields existed (same run id: its cached teacher is found)."""
    data = _common(plan, plan.teacher_steps, plan.teacher_lr, cache_dir)
    train = data["data"]["train"]
    train["seed"] = plan.teacher_seed
    if not plan.teacher_holdout:
        train["options"]["holdout"] = False
    data.update(
        name=plan.teacher_name,
        teacher=None,
        student={"model": TEACHER_MODEL},
        inheritance={"name": "none"},
        losses=[{"name": "clip", "weight": 1.0}],
    )
    return config_from_dict(data)


def student_configs(plan: DemoPlan, teacher_path: str, results_dir: Path) -> list[tuple[str, RunConfig]]:
    affinity = [{"name": "affinity", "weight": 1.0, "scale": 50}]
    variants = [
        ("(a) scratch + CLIP loss", {"name": "none"}, [{"name": "clip", "weight": 1.0}], STUDENT_MODEL),
        ("(b) scratch + affinity", {"name": "none"}, affinity, STUDENT_MODEL),
        ("(c) manual inheritance + affinity", {"name": "manual"}, affinity, STUDENT_MODEL),
    ]
    from compress.registry import INHERITANCE

    if "auto" in INHERITANCE:
        prune_step = int(plan.student_steps * plan.prune_fraction)
        # masks must move log_alpha from 10 to below 0 within a few hundred steps: faster than
        # TinyCLIP's 0.02 (tuned for thousands of steps). round_to 1: the demo towers are 128 wide,
        # where rounding widths to a multiple of 8 would move the sparsity by several points
        auto = {"name": "auto", "target_sparsity": 0.5, "prune_step": prune_step,
                "ramp_steps": max(prune_step // 2, 1), "mask_lr": 0.3, "lambda_lr": 1.0, "round_to": 1}
        variants.append(("(d) auto inheritance + affinity", auto, affinity, None))
    out = []
    for label, inheritance, losses, student in variants:
        data = _common(plan, plan.student_steps, plan.student_lr, results_dir)
        data.update(
            name="demo-" + label.split()[0].strip("()"),
            teacher={"model": teacher_path},
            student={"model": student} if student else None,
            inheritance=inheritance,
            losses=losses,
        )
        out.append((label, config_from_dict(data)))
    return out


#: the demo table's columns: metric -> header
TABLE_COLUMNS = {
    "zs/color_shape/top1": "zero-shot top-1",
    "zs/color_shape/top1_seen": "top-1 seen pairs",
    "zs/color_shape/top1_heldout": "top-1 held-out pairs",
    "ret/val/i2t_r1": "R@1 i2t",
    "ret/val/t2i_r1": "R@1 t2i",
    "params": "params (w/o token emb.)",
    "throughput/pairs_per_s": "pairs/s",
    "train/duration_s": "train s",
}


def demo_table(frame: Any) -> Any:
    """The demo's table (``analysis.tables``): one row per ``model`` (in the frame's order), a column per metric."""
    from analysis.tables import ablation_table

    return ablation_table(frame, rows=["model"], values=list(TABLE_COLUMNS), labels=TABLE_COLUMNS, sort=False)


def run_demo(quick: bool = False, results_dir: str | Path = "results/demo", cache_dir: str | Path | None = None,
             force: bool = False) -> Any:
    """Run the demo and return its result rows (a pandas DataFrame indexed by model label)."""
    from analysis.load import load_results
    from compress.recipe import run_dir_for

    plan = QUICK if quick else FULL
    results = Path(results_dir) / ("quick" if quick else "full")
    check_output(results, "--results", folder=True)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    teacher_path = train_teacher(plan, cache, force, "demo")["metrics"]["export/path"]
    labels = {str(run_dir_for(teacher_config(plan, cache))): "teacher"}
    for label, cfg in student_configs(plan, teacher_path, results):
        print(f"[demo] student {label}: {plan.student_steps} steps")
        dispatch([cfg], backend="inline", force=force)
        labels[str(run_dir_for(cfg))] = label
    frame = load_results(list(labels))
    frame = frame[frame["row"] == "run"].assign(model=lambda f: f["path"].map(labels))
    frame = frame.sort_values("model", key=lambda models: models.map(list(labels.values()).index))
    save_table(demo_table(frame).to_markdown(notes=False).rstrip("\n"), results / "demo_table.md", "demo")
    return frame.set_index("model")


def train_teacher(plan: DemoPlan, cache: Path, force: bool, tag: str) -> dict[str, Any]:
    """Train the demo teacher (or reuse the cached one) and return its result row."""
    print(f"[{tag}] teacher {plan.teacher_name}: {TEACHER_MODEL}, {plan.teacher_steps} steps (cached in {cache})")
    (row,) = dispatch([teacher_config(plan, cache)], backend="inline", force=force)
    if row.get("status") not in ("completed", "skipped"):
        raise RuntimeError(f"the {plan.teacher_name} failed: {row.get('error')}")
    return row


def save_table(text: str, path: Path, tag: str) -> None:
    """Write a markdown table next to the result rows and print it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    print()
    print(text)
    print(f"\n[{tag}] result rows in {path.parent}, table in {path}")

