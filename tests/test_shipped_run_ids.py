"""The run ids of every shipped config, sweep and demo run stay what they were: a run id names a run directory
on someone's disk, so a refactoring that changed one would orphan finished runs (resubmitting a sweep would run
them again). ``tests/data/shipped_run_ids.json`` holds the ids as they were; regenerate it only for a change
that is meant to give new ids: ``python tests/test_shipped_run_ids.py --write``."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from compress.recipe import run_id_of

ROOT = Path(__file__).parent.parent
CONFIG_ROOT = ROOT / "experiments" / "configs"
TABLE = Path(__file__).parent / "data" / "shipped_run_ids.json"
#: the ablation sweeps distil from the demo's trained teacher, passed as a path whose fingerprint changes with
#: every training; a fixed randomly initialised teacher stands in for it so that the ids are stable
SWEEP_OVERRIDES = ["teacher.model=cc-demo-teacher", "teacher.random_init=true"]


def shipped_sweeps() -> list[Path]:
    sweeps = sorted((ROOT / "experiments" / "sweeps").glob("*.yaml"))
    return sweeps + sorted(p for p in (CONFIG_ROOT / "ablations").rglob("*.yaml") if p.name != "base.yaml")


def current_ids() -> dict[str, str]:
    """``{what: run id}`` for every shipped run config, every run of every shipped sweep and every demo run."""
    from compress.recipe import load_config
    from experiments.demo import FULL, QUICK, WEB_TEACHER, student_configs, teacher_config
    from experiments.sweep import load_sweep

    ids: dict[str, str] = {}
    for path in sorted(p for p in CONFIG_ROOT.rglob("*.yaml") if "ablations" not in p.relative_to(CONFIG_ROOT).parts):
        ids[f"config {path.relative_to(ROOT)}"] = run_id_of(load_config(path))
    for path in shipped_sweeps():
        overrides = SWEEP_OVERRIDES if "ablations" in path.relative_to(ROOT).parts else []
        for run in load_sweep(path, overrides).runs():
            ids[f"sweep {path.relative_to(ROOT)} run {run.index}"] = run_id_of(run.cfg)
    with tempfile.TemporaryDirectory() as tmp:  # the demo's students distil from a folder: a fixed stand-in
        teacher = Path(tmp) / "teacher-model"
        teacher.mkdir()
        (teacher / "model.safetensors").write_bytes(b"0" * 64)
        os.utime(teacher / "model.safetensors", ns=(1, 1))
        cwd = Path.cwd()
        os.chdir(tmp)  # the model path is written relative, so the id does not depend on where tmp is
        try:
            for label, plan in (("full", FULL), ("quick", QUICK)):
                ids[f"demo {label} teacher"] = run_id_of(teacher_config(plan, Path("/cache")))
                for name, cfg in student_configs(plan, "teacher-model", Path("/results")):
                    ids[f"demo {label} {name}"] = run_id_of(cfg)
        finally:
            os.chdir(cwd)
    ids["demo web teacher"] = run_id_of(teacher_config(WEB_TEACHER, Path("/cache")))  # the web benchmark's
    return ids


def test_run_ids_of_the_shipped_configs_sweeps_and_demo_are_unchanged():
    expected = json.loads(TABLE.read_text())
    current = current_ids()
    assert sorted(current) == sorted(expected), "the shipped configs changed: regenerate the table if meant"
    changed = {k: (expected[k], current[k]) for k in expected if expected[k] != current[k]}
    assert not changed, f"run ids changed (was, now): {changed}"


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_shipped_run_ids.py --write")
    TABLE.write_text(json.dumps(current_ids(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {TABLE}")
