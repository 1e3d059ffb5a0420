"""Loading result rows and curves: run folders (sweep folders searched), staged runs, JSON Lines."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from analysis.load import AnalysisError, load_curves, load_results, loss_label, results_frame

AFFINITY = [{"name": "affinity", "weight": 1.0, "scale": 50}]


def _write(path: Path, row: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "result.json").write_text(json.dumps(row))


def _row(seed: int, status: str = "completed", **config) -> dict:
    base = {"seed": seed, "teacher": {"model": "/cache/demo-teacher-ab12/model"}, "student": None,
            "inheritance": {"name": "manual"}, "losses": AFFINITY, "train": {"steps": 100, "batch_size": 16}}
    return {"run_id": f"id{seed}", "name": "r", "status": status, "config": {**base, **config},
            "metrics": {"zs/t/top1": 50.0 + seed, "train/duration_s": 5.0, "params/vision": 10, "params/text": 5}
            if status == "completed" else {}, **({"error": "ValueError: boom"} if status == "failed" else {})}


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    _write(root / "plain-0", _row(0))
    (root / "plain-0" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "lr": 0.1 * s, "loss": 4.0 - s, "loss/affinity": 4.0 - s, "note": "x"}) + "\n"
        for s in (1, 2, 3)))
    _write(root / "nested" / "broken-1", _row(1, status="failed"))
    stages = [{"name": "s50", "target_sparsity": 0.5, "steps": 30},
              {"name": "s75", "target_sparsity": 0.75, "steps": 70, "losses": [{"name": "clip"}]}]
    staged = _row(2, inheritance={"name": "auto"}, stages=stages)
    staged["metrics"].update({"stage/name": "s75", "sparsity/target": 0.75, "train/duration_s": 7.0})
    _write(root / "staged-2", staged)
    parts = [("s50", 30, 3.0, AFFINITY), ("s75", 70, 7.0, [{"name": "clip"}])]
    for k, (name, steps, seconds, losses) in enumerate(parts):
        stage_row = _row(2, inheritance={"name": "auto", "target_sparsity": 0.5}, losses=losses,
                         train={"steps": steps, "batch_size": 16})
        stage_row["metrics"].update({"stage/name": name, "train/duration_s": seconds})
        _write(root / "staged-2" / "stages" / f"{k}-{name}", stage_row)
    return root


def test_run_folders_stage_rows_and_failed_runs(sweep: Path) -> None:
    df = load_results(sweep).set_index("path")
    assert sorted((Path(p).relative_to(sweep).as_posix(), r) for p, r in df["row"].items()) == [
        ("nested/broken-1", "run"), ("plain-0", "run"), ("staged-2", "run"),
        ("staged-2/stages/0-s50", "stage"), ("staged-2/stages/1-s75", "stage")]
    broken = df.loc[str(sweep / "nested" / "broken-1")]
    assert broken["failed"] and broken["status"] == "failed" and broken["error"] == "ValueError: boom"
    plain = df.loc[str(sweep / "plain-0")]
    assert not plain["failed"] and plain["zs/t/top1"] == 50.0 and plain["train.steps"] == 100
    assert (plain["loss"], plain["inheritance"], plain["teacher"], plain["student"]) == (
        "affinity", "manual", "demo-teacher-ab12", "(pruned teacher)")
    assert (plain["steps"], plain["samples_seen"], plain["train_time_s"], plain["params"]) == (100, 1600, 5.0, 15)
    assert plain["stage"] == "" and math.isnan(plain["target_sparsity"])


def test_staged_run_budget_is_summed_over_its_stages(sweep: Path) -> None:
    df = load_results(sweep).set_index("path")
    run = df.loc[str(sweep / "staged-2")]
    assert (run["steps"], run["samples_seen"]) == (100, 1600)  # 30 + 70 steps of 16
    assert run["train_time_s"] == 10.0  # 3 s + 7 s of the stage rows, not the last stage's 7 s
    assert (run["stage"], run["target_sparsity"], run["inheritance"]) == ("s75", 0.75, "auto")
    assert run["loss"] == "affinity→clip"
    first = df.loc[str(sweep / "staged-2" / "stages" / "0-s50")]
    assert (first["steps"], first["train_time_s"], first["stage"]) == (30, 3.0, "s50")


def test_json_lines_and_run_folders_mix_and_a_folder_given_twice_is_one_row(sweep: Path, tmp_path: Path) -> None:
    lines = tmp_path / "collected.jsonl"
    lines.write_text(json.dumps({**_row(5), "row": "run", "path": "elsewhere/r5"}) + "\n\n")
    df = load_results([lines, sweep / "plain-0", sweep])
    assert len(df) == 6 and df["path"].tolist().count(str(sweep / "plain-0")) == 1
    assert df.set_index("path").loc["elsewhere/r5", "seed"] == 5


def test_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"status": "completed"}\n[1, 2]\n')
    with pytest.raises(AnalysisError, match=r"bad.jsonl:2: a JSON list, not a result row"):
        load_results(bad)
    with pytest.raises(AnalysisError, match="no such file or directory"):
        load_results(tmp_path / "missing")


def test_loss_label_shows_only_the_parameters_that_differ() -> None:
    rows = [{"config": {"losses": AFFINITY}},
            {"config": {"losses": [{"name": "affinity", "weight": 1.0, "scale": 50, "weight_t2i": 0.0}]}},
            {"config": {"losses": [*AFFINITY, {"name": "clip", "weight": 0.5}]}}]
    assert results_frame(rows)["loss"].tolist() == ["affinity", "affinity(t2i=0)", "affinity+clip"]
    assert loss_label([{"name": "clip", "weight": 0.5}], {"clip": {"weight"}}) == "clip(weight=0.5)"
    assert loss_label([]) == "none"


def test_curves_are_long_with_the_run_aliases(sweep: Path) -> None:
    curves = load_curves(sweep)
    assert set(curves["term"]) == {"lr", "loss", "loss/affinity"}  # the string column is not a curve
    loss = curves[curves["term"] == "loss"]
    assert loss["step"].tolist() == [1, 2, 3] and loss["value"].tolist() == [3.0, 2.0, 1.0]
    assert set(loss["loss"]) == {"affinity"} and set(loss["seed"]) == {0}
