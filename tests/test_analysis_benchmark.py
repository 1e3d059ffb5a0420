"""analysis.benchmark: DataComp eval_results.jsonl and clip_benchmark JSON into frames (a column per
task, the mean over a task list)."""

from __future__ import annotations

import json
import math

import pytest

from analysis.benchmark import load_clip_benchmark, load_eval_results
from analysis.columns import AnalysisError
from compress.result_files import TaskResult, field_metrics, write_result_files
from compress.tasklist import parse_task

CARS = parse_task("cars", {"name": "Stanford Cars"})
PETS = parse_task("vtab/pets", {"name": "Pets", "main_metric": "mean_per_class_recall"})
FLICKR = parse_task("retrieval/flickr30k", {"name": "Flickr"})


def _write(folder, model, results):
    write_result_files(folder, results, model)
    (folder / "summary.json").write_text(json.dumps({"model": model}))


def _cls(task, top1, recall):
    return TaskResult(task, field_metrics(task.kind, {"top1": top1, "top5": 90.0, "mean_per_class_recall": recall}), {})


@pytest.fixture
def two_models(tmp_path):
    _write(tmp_path / "a", "student-a", [_cls(CARS, 50.0, 40.0), _cls(PETS, 80.0, 70.0),
                                          TaskResult(FLICKR, field_metrics(FLICKR.kind, {"i2t_r1": 30.0,
                                                                                         "t2i_r1": 20.0}), {})])
    _write(tmp_path / "b", "student-b", [_cls(CARS, 60.0, 50.0)])
    tasks = tmp_path / "tasks.yml"
    tasks.write_text("cars: {name: Stanford Cars}\nvtab/pets: {main_metric: mean_per_class_recall}\n"
                     "retrieval/flickr30k: {name: Flickr}\n")
    return tmp_path, tasks


def test_a_column_per_task_and_the_mean_over_the_task_list(two_models):
    root, tasks = two_models
    frame = load_eval_results(root, tasks).set_index("model")
    assert list(frame.columns) == ["path", "cars", "vtab/pets", "retrieval/flickr30k", "tasks_listed", "tasks_scored",
                                   "tasks_missing", "mean_scored"]
    a, b = frame.loc["student-a"], frame.loc["student-b"]
    assert a["cars"] == 0.5 and a["vtab/pets"] == 0.7 and a["retrieval/flickr30k"] == pytest.approx(0.25)
    assert a["mean_scored"] == pytest.approx((0.5 + 0.7 + 0.25) / 3) and a["tasks_missing"] == 0
    # the mean says over what: over the 1 task scored of the 3 listed (not an average of the list)
    assert b["cars"] == 0.6 and math.isnan(b["vtab/pets"]) and b["tasks_missing"] == 2
    assert (b["tasks_scored"], b["tasks_listed"], b["mean_scored"]) == (1, 3, 0.6)
    acc1 = load_eval_results(root / "a" / "eval_results.jsonl", metric="acc1").iloc[0]
    assert acc1["vtab/pets"] == 0.8 and math.isnan(acc1["retrieval/flickr30k"])


def test_datacomps_own_lines_and_task_list(tmp_path):
    """A line as DataComp's evaluate.py writes it (``json.dumps({"key", "dataset", "metrics"})``, ``acc5`` None
    under 5 classes, no summary.json) read against DataComp's own tasklist.yml: its 40 keys are columns, the
    skipped ones count as missing, the mean is over the tasks scored."""
    from pathlib import Path

    line = {"key": "vtab/pcam", "dataset": "PatchCamelyon",
            "metrics": {"acc1": 0.5, "acc5": None, "mean_per_class_recall": 0.5, "main_metric": 0.5}}
    (tmp_path / "eval_results.jsonl").write_text(json.dumps(line) + "\n")
    listed = Path(__file__).resolve().parent / "data" / "datacomp_tasklist.yml"
    row = load_eval_results(tmp_path, listed).iloc[0]
    assert (row["tasks_listed"], row["tasks_scored"], row["tasks_missing"], row["mean_scored"]) == (40, 1, 39, 0.5)
    assert math.isnan(row["fairness/geode"]) and row["model"] == tmp_path.name


def test_clip_benchmark_files_as_rows(two_models):
    root, _ = two_models
    frame = load_clip_benchmark(root).sort_values(["model", "dataset"]).reset_index(drop=True)
    assert list(frame["dataset"]) == ["wds/cars", "wds/retrieval/flickr30k", "wds/vtab/pets", "wds/cars"]
    assert list(frame["model"]) == ["student-a"] * 3 + ["student-b"]
    assert frame.loc[0, "acc1"] == 0.5 and frame.loc[1, "text_retrieval_recall@1"] == 0.3


def test_errors(tmp_path):
    with pytest.raises(AnalysisError, match="no eval_results.jsonl"):
        load_eval_results(tmp_path)
    bad = tmp_path / "eval_results.jsonl"
    bad.write_text('{"dataset": "x"}\n')
    with pytest.raises(AnalysisError, match="not a DataComp result line"):
        load_eval_results(bad)
    with pytest.raises(AnalysisError, match="no clip_benchmark result JSON"):
        load_clip_benchmark(tmp_path)
