"""Progressive against one-shot pruning on the embedded data: TinyCLIP's multi-stage progressive distillation
(Wu et al., "TinyCLIP: CLIP Distillation via Affinity Mimicking and Weight Inheritance", ICCV 2023).

``python -m experiments.progressive [--quick]`` distils the demo's teacher (trained once and
cached, as ``clip-compress demo`` does) into students with 75% of its prunable parameters
removed by automatic inheritance, in two ways with the same teacher and the same total steps:

- progressive: two stages, 0 -> 0.5 -> 0.75 (cumulative targets), ``S`` steps each;
- one-shot: one stage, 0 -> 0.75, ``2 S`` steps.

Both are ordinary staged run configs (:func:`arm_configs`; each run directory keeps its
resolved ``config.yaml``, which ``clip-compress run`` reruns); a table of zero-shot top-1,
retrieval R@1 and achieved sparsity per stage is printed and saved next to the runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from compress.config import RunConfig
from compress.recipe import config_from_dict, run_dir_for
from compress.rundir import RunDir
from experiments.demo import FULL, QUICK, DemoPlan, _common, default_cache_dir, save_table, train_teacher
from experiments.dispatch import dispatch

#: cumulative targets of the two arms
PROGRESSIVE = (0.5, 0.75)
ONE_SHOT = (0.75,)


def arm_configs(plan: DemoPlan, teacher_path: str, results_dir: Path, seed: int = 0) -> dict[str, RunConfig]:
    """The two arms: the demo's student settings, automatic inheritance (masks learned for 60% of a
    stage, as in the demo), ``2 x student_steps`` steps in all, run seed ``seed``."""
    total = 2 * plan.student_steps
    out = {}
    for name, targets in (("progressive", PROGRESSIVE), ("one-shot", ONE_SHOT)):
        steps = total // len(targets)
        prune_step = int(steps * plan.prune_fraction)
        data = _common(plan, steps, plan.student_lr, results_dir)
        data.update(
            name=f"progressive-vs-oneshot-{name}",
            seed=seed,
            teacher={"model": teacher_path},
            student=None,
            # mask and multiplier learning rates as in the demo (a few hundred steps, not thousands);
            # round_to 1: 128-wide towers
            inheritance={"name": "auto", "prune_step": prune_step, "ramp_steps": max(prune_step // 2, 1),
                         "mask_lr": 0.3, "lambda_lr": 1.0, "round_to": 1},
            losses=[{"name": "affinity", "weight": 1.0, "scale": 50}],
            stages={"targets": list(targets), "steps": steps},
        )
        out[name] = config_from_dict(data)
    return out


def summary_rows(name: str, seed: int, run_dir: Path) -> list[dict[str, Any]]:
    """One line per stage of an arm (from the stage rows), the last one being the arm's result."""
    import json

    lines = []
    for path in [stage.result for stage in RunDir(run_dir).stages() if stage.result.is_file()]:
        m = json.loads(path.read_text()).get("metrics", {})
        lines.append({
            "arm": name,
            "seed": seed,
            "stage": m.get("stage/name"),
            "steps": m.get("train/steps"),
            "target (cumulative)": m.get("sparsity/target"),
            "achieved": m.get("sparsity/achieved"),
            "zero-shot top-1": m.get("zs/color_shape/top1"),
            "top-1 held-out pairs": m.get("zs/color_shape/top1_heldout"),
            "R@1 i2t": m.get("ret/val/i2t_r1"),
            "R@1 t2i": m.get("ret/val/t2i_r1"),
        })
    return lines


def run_comparison(quick: bool = False, results_dir: str | Path = "results/progressive",
                   cache_dir: str | Path | None = None, force: bool = False, seeds: tuple[int, ...] = (0,)) -> Any:
    """Train (or reuse) the demo teacher, run both arms for every seed, print and save the table
    (one line per arm, seed and stage; with several seeds, then the mean per arm and stage)."""
    import pandas as pd

    plan = QUICK if quick else FULL
    results = Path(results_dir) / ("quick" if quick else "full")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    teacher_row = train_teacher(plan, cache, False, "progressive")
    lines = []
    for seed in seeds:
        for name, cfg in arm_configs(plan, teacher_row["metrics"]["export/path"], results, seed).items():
            print(f"[progressive] {name}, seed {seed}: {len(cfg.stages)} stage(s) of {cfg.stages[0].steps} steps")
            (row,) = dispatch([cfg], backend="inline", force=force)
            if row.get("status") not in ("completed", "skipped"):
                raise RuntimeError(f"arm {name} failed: {row.get('error')}")
            lines.extend(summary_rows(name, seed, run_dir_for(cfg)))
    table = pd.DataFrame(lines)
    text = table.to_markdown(index=False, floatfmt=".3f")
    if len(seeds) > 1:
        means = table.drop(columns="seed").groupby(["arm", "stage"], sort=False).mean().reset_index()
        text += f"\n\nmean over {len(seeds)} seeds:\n\n" + means.to_markdown(index=False, floatfmt=".3f")
    save_table(text, results / "progressive_table.md", "progressive")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.progressive", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the demo's quick sizes (a smoke test, minutes)")
    parser.add_argument("--results", default="results/progressive", help="folder for the runs and the table")
    parser.add_argument("--cache-dir", default=None, help="where the demo teacher is cached")
    parser.add_argument("--force", action="store_true", help="rerun both arms from step 0")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="run seeds (default: 0)")
    args = parser.parse_args(argv)
    run_comparison(quick=args.quick, results_dir=args.results, cache_dir=args.cache_dir, force=args.force,
                   seeds=tuple(args.seeds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
