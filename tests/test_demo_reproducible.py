"""The demo is reproducible: the same ``clip-compress demo`` command run twice (two processes, with
``--force`` the second time so that everything is trained again) gives the same result rows, the same
training curves and the same exported weights; only timings differ (issue 16, point 3)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from compress.step_timer import is_timing_key

#: the miniature demo (``test_cli.test_miniature_demo_runs_every_student``'s sizes), then the real command
MINIATURE = """
import sys
from experiments import cli, demo
demo.QUICK = demo.DemoPlan(teacher_steps=3, student_steps=4, batch_size=8, teacher_lr=1e-3, student_lr=1e-3,
                           val_samples=40, train_samples=64)
sys.exit(cli.main(["demo", "--quick", *sys.argv[1:]]))
"""

#: what a run measures of the machine, not of the model: wall-clock times and speeds
TIMING_KEYS = {"started_at", "duration_s"}
TIMING_METRICS = {"train/samples_per_s", "train/duration_s", "throughput/images_per_s", "throughput/texts_per_s",
                  "throughput/pairs_per_s"}
TIMING_TABLE_COLUMNS = {"pairs/s", "train s"}


def _demo(root: Path, hash_seed: str, *extra: str) -> str:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "HF_HUB_OFFLINE": "1"}
    args = ["--results", str(root / "results"), "--cache-dir", str(root / "cache"), *extra]
    done = subprocess.run([sys.executable, "-c", MINIATURE, *args], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _table(path: Path) -> list[list[str]]:
    """The demo table without its timing columns."""
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in path.read_text().splitlines()]
    keep = [i for i, header in enumerate(rows[0]) if header not in TIMING_TABLE_COLUMNS]
    assert len(keep) == len(rows[0]) - len(TIMING_TABLE_COLUMNS)
    return [[row[i] for i in keep] for row in rows]


def _outcome(root: Path) -> dict[str, Any]:
    """Every run's result row, training curve and exported weights, timings left out; the demo table."""
    out: dict[str, Any] = {"table": _table(root / "results" / "quick" / "demo_table.md")}
    for result in sorted(root.glob("*/**/result.json")):
        run = result.parent
        row = {k: v for k, v in json.loads(result.read_text()).items() if k not in TIMING_KEYS}
        row["metrics"] = {k: v for k, v in row["metrics"].items() if k not in TIMING_METRICS}
        curve = [{k: v for k, v in json.loads(line).items() if not is_timing_key(k)}
                 for line in (run / "metrics.jsonl").read_text().splitlines()]
        weights = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((run / "model").iterdir())}
        out[str(run.relative_to(root))] = {"row": row, "curve": curve, "weights": weights}
    return out


@pytest.mark.slow
def test_two_runs_of_the_same_demo_command_give_identical_rows(tmp_path):
    first = _demo(tmp_path, "1")
    before = _outcome(tmp_path)
    again = _demo(tmp_path, "2", "--force")  # another process, another string hash order, everything retrained
    assert "[skip]" not in again and "[demo] student (d)" in again
    after = _outcome(tmp_path)
    assert len(before) == 1 + 5  # the table, the teacher and four students
    assert all(entry["row"]["status"] == "completed" for key, entry in before.items() if key != "table")
    for key in before:
        assert after[key] == before[key], key
    assert "[demo] student (d)" in first
