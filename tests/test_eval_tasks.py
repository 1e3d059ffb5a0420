"""``clip-compress eval --tasks LIST``: DataComp task lists, data sets looked up before the model is
loaded, clip_benchmark's per-task JSON and DataComp's eval_results.jsonl (golden), and numbers equal
to a run's own evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from compress.evaluation.standalone import EvalError
from compress.evaluation.task_eval import evaluate_tasks
from compress.result_files import TaskResult, field_metrics, template_hash, write_result_files
from compress.tasklist import SkippedTask, TaskListError, load_task_list, parse_task, read_task_list
from experiments.cli import main

ROOT = Path(__file__).resolve().parents[1]
TASKLISTS = ROOT / "experiments" / "tasklists"
#: DataComp's own tasklist.yml, verbatim (its source and commit in the file's first line)
DATACOMP_TASKLIST = Path(__file__).resolve().parent / "data" / "datacomp_tasklist.yml"
#: what this evaluator cannot score in DataComp's list: group metrics, WinoGAViL's Jaccard score
DATACOMP_SKIPPED = ["misc/winogavil", "wilds/iwildcam", "wilds/fmow", "fairness/dollar_street", "fairness/geode",
                    "fairness/fairface", "fairness/utkface"]


def test_shipped_task_lists_parse():
    datacomp = load_task_list(TASKLISTS / "datacomp_zeroshot.yml")
    assert len(datacomp) == 33
    by_key = {t.key: t for t in datacomp}
    assert by_key["imagenet1k"].name == "ImageNet 1k" and by_key["imagenet1k"].main_metric == "acc1"
    assert by_key["vtab/pets"].main_metric == "mean_per_class_recall"
    flickr = by_key["retrieval/flickr_1k_test_image_text_retrieval"]
    assert (flickr.kind, flickr.main_metric, flickr.dataset) == ("zeroshot_retrieval", "mean_recall@1", "flickr30k")
    assert flickr.extra["size"] == 1000  # DataComp's size: the 1000-image test split (checked against the set)
    assert by_key["cars"].extra == {"size": 8041, "num_classes": 196, "random_score": 0.00516}
    synthetic = load_task_list(TASKLISTS / "synthetic.yml")
    assert [t.key for t in synthetic] == ["shapes_color_shape", "shapes_shape", "shapes_color", "shapes_retrieval"]


def test_datacomps_own_task_list_is_read_as_is():
    """DataComp's tasklist.yml: the tasks this evaluator cannot score are skipped (one line names them), Camelyon17
    (main metric acc1 by DataComp's default) is scored as classification, and every task of the shipped list is
    DataComp's entry (key, name, size, main metric, classes, tags)."""
    import yaml

    listed = read_task_list(DATACOMP_TASKLIST)
    assert listed.total == 40 and len(listed.tasks) == 33
    assert sorted(listed.skipped) == sorted(DATACOMP_SKIPPED)
    line = listed.skipped_line()
    assert line.startswith("7 of 40 tasks skipped") and "\n" not in line
    assert "wilds/fmow (main metric acc_worst_region is a WILDS group metric)" in line
    camelyon = {t.key: t for t in listed.tasks}["wilds/camelyon17"]
    assert (camelyon.kind, camelyon.main_metric) == ("zeroshot_classification", "acc1")
    theirs = yaml.safe_load(DATACOMP_TASKLIST.read_text())
    ours = yaml.safe_load((TASKLISTS / "datacomp_zeroshot.yml").read_text())
    assert set(ours) == {t.key for t in listed.tasks}
    for key, entry in ours.items():
        for field in ("name", "size", "main_metric", "num_classes", "random_score", "tags"):
            assert entry.get(field) == theirs[key].get(field) or (field == "tags" and not theirs[key].get(field)), \
                (key, field)


@pytest.mark.parametrize(("key", "entry", "message"), [
    ("wilds/fmow", {"main_metric": "acc_worst_region"}, "WILDS group metric"),
    ("fairness/geode", {"main_metric": "acc_wg"}, "not plain zero-shot classification or retrieval"),
    ("cars", {"main_metric": "mean_recall@1"}, "not a zeroshot_classification metric"),
    ("cars", {"format": "lmdb"}, "format 'lmdb'"),
    ("cars", {"format": "folder"}, "needs a path"),
    ("pairs", {"format": "csv", "path": "x.csv", "task": "zeroshot_classification"}, "not a zeroshot_classification"),
    ("cars", {"templates": ["no placeholder"]}, "placeholder"),
    ("cars", {"image_key": "f"}, "only for format csv"),
])
def test_task_list_mistakes_are_refused(key, entry, message):
    with pytest.raises(TaskListError, match=message) as error:
        parse_task(key, entry)
    assert isinstance(error.value, SkippedTask) == key.startswith(("wilds/", "fairness/"))


def test_task_list_names_and_keys_differ(tmp_path):
    path = tmp_path / "t.yml"
    path.write_text("a: {name: X}\nb: {name: X}\n")
    with pytest.raises(TaskListError, match=r"task names must differ .*\['X'\]"):
        load_task_list(path)
    path.write_text("vtab/a: {}\nvtab-a: {}\n")
    with pytest.raises(TaskListError, match="keys with / written - must differ"):
        load_task_list(path)
    with pytest.raises(TaskListError, match="no such task list"):
        load_task_list(tmp_path / "none.yml")


def test_task_defaults():
    assert parse_task("cifar10", None).kind == "zeroshot_classification"
    assert parse_task("pairs", {"format": "csv", "path": "p.csv"}).kind == "zeroshot_retrieval"
    assert parse_task("x", {"tags": ["retrieval"]}).main_metric == "mean_recall@1"


# --- golden result files --------------------------------------------------------------------------


def _golden_results() -> list[TaskResult]:
    cls = parse_task("vtab/pets", {"name": "Oxford-IIIT Pet", "main_metric": "mean_per_class_recall"})
    few = parse_task("renderedsst2", {"name": "Rendered SST2"})
    ret = parse_task("retrieval/flickr_1k_test_image_text_retrieval", {"name": "Flickr", "dataset": "flickr30k"})
    return [
        TaskResult(cls, field_metrics(cls.kind, {"top1": 62.5, "top5": 87.5, "mean_per_class_recall": 50.0}), {},
                   template_hash(["a photo of a {}, a type of pet."]), "c" * 64),
        TaskResult(few, field_metrics(few.kind, {"top1": 75.0, "mean_per_class_recall": 75.0}), {}, "a" * 64,
                   "b" * 64),
        TaskResult(ret, field_metrics(ret.kind, {"i2t_r1": 50.0, "t2i_r1": 25.0, "i2t_r5": 100.0, "t2i_r5": 75.0,
                                                 "i2t_r10": 100.0, "t2i_r10": 100.0}), {}),
    ]


#: DataComp's line format (mlfoundations/datacomp evaluate.py at 4a8df19):
#:     results[task_name] = {"key": task_key, "dataset": task_name, "metrics": metrics}
#:     f.write(json.dumps(results[task_name]) + "\\n")
#: where ``metrics`` is eval_utils/wds_eval.py's {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": ...}
#: (``acc5 = None`` under 5 classes) or retr_eval.py's clip_benchmark ``zsr.evaluate(..., recall_k_list=[1, 5, 10])``
#: plus ``metrics["mean_recall@1"]``, then
#:     metrics["main_metric"] = metrics.get(tasks[task_key].get("main_metric", "acc1"))
#: This project adds the two hashes after ``metrics``.
GOLDEN_JSONL = (
    '{"key": "vtab/pets", "dataset": "Oxford-IIIT Pet", "metrics": {"acc1": 0.625, "acc5": 0.875, '
    '"mean_per_class_recall": 0.5, "main_metric": 0.5}, "templates_sha256": '
    '"%s", "classnames_sha256": "%s"}\n'
    '{"key": "renderedsst2", "dataset": "Rendered SST2", "metrics": {"acc1": 0.75, "acc5": null, '
    '"mean_per_class_recall": 0.75, "main_metric": 0.75}, "templates_sha256": "%s", "classnames_sha256": "%s"}\n'
    '{"key": "retrieval/flickr_1k_test_image_text_retrieval", "dataset": "Flickr", "metrics": {'
    '"image_retrieval_recall@1": 0.25, '
    '"text_retrieval_recall@1": 0.5, "image_retrieval_recall@5": 0.75, "text_retrieval_recall@5": 1.0, '
    '"image_retrieval_recall@10": 1.0, "text_retrieval_recall@10": 1.0, "mean_recall@1": 0.375, '
    '"main_metric": 0.375}}\n'
)
GOLDEN_PETS = (
    '{"dataset": "wds/vtab/pets", "model": "tiny", "pretrained": "", "task": "zeroshot_classification", '
    '"metrics": {"acc1": 0.625, "acc5": 0.875, "mean_per_class_recall": 0.5}, "language": "en", '
    '"templates_sha256": "%s", "classnames_sha256": "%s"}'
)
GOLDEN_SST2_METRICS = '"metrics": {"acc1": 0.75, "acc5": NaN, "mean_per_class_recall": 0.75}'
GOLDEN_FLICKR = (
    '{"dataset": "wds/flickr30k", "model": "tiny", "pretrained": "", "task": "zeroshot_retrieval", '
    '"metrics": {"image_retrieval_recall@1": 0.25, "text_retrieval_recall@1": 0.5, "image_retrieval_recall@5": '
    '0.75, "text_retrieval_recall@5": 1.0, "image_retrieval_recall@10": 1.0, "text_retrieval_recall@10": 1.0}, '
    '"language": "en"}'
)


def test_golden_result_files(tmp_path):
    """Byte for byte what clip_benchmark 1.6.2 (``json.dump`` of its dict: NaN for a missing top-5) and DataComp
    (one ``json.dumps`` line per task: None for it, ``main_metric`` added) write, plus the hashes."""
    results = _golden_results()
    pets_hash = template_hash(["a photo of a {c}, a type of pet."])
    assert pets_hash == template_hash(["a photo of a {}, a type of pet."])  # the {} form hashes as the {c} form
    written = write_result_files(tmp_path, results, "tiny")
    assert (tmp_path / "eval_results.jsonl").read_text() == GOLDEN_JSONL % (pets_hash, "c" * 64, "a" * 64, "b" * 64)
    names = sorted(p.name for p in written["clip_benchmark"])
    assert names == ["flickr30k__tiny_en_zeroshot_retrieval.json", "renderedsst2__tiny_en_zeroshot_classification.json",
                     "vtab_pets__tiny_en_zeroshot_classification.json"]
    folder = tmp_path / "clip_benchmark"
    assert (folder / names[2]).read_text() == GOLDEN_PETS % (pets_hash, "c" * 64)
    assert GOLDEN_SST2_METRICS in (folder / names[1]).read_text()
    assert (folder / names[0]).read_text() == GOLDEN_FLICKR
    assert math.isnan(json.loads((folder / names[1]).read_text())["metrics"]["acc5"])


def test_template_hash_is_sha256sum_of_the_templates_file(tmp_path):
    import hashlib

    from test_benchmark_sets import _images

    from compress.data.benchmark_sets import write_wds_classification

    templates = ["a photo of a {}.", "itap of a {c}."]
    folder = write_wds_classification(tmp_path, "t", _images(1), [0], ["x"], templates)
    digest = hashlib.sha256((folder / "zeroshot_classification_templates.txt").read_bytes()).hexdigest()
    assert template_hash(templates) == digest


# --- evaluation ------------------------------------------------------------------------------------


def _task_list(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tasks.yml"
    path.write_text(text)
    return path


def test_missing_sets_are_listed_before_the_model_is_loaded(tmp_path, monkeypatch):
    import compress.evaluation.task_eval as task_eval
    from compress.data.benchmark_export import export_synthetic

    export_synthetic(tmp_path / "data", num_samples=4, tasks=("shape",), retrieval=False)
    monkeypatch.setattr(task_eval, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    tasks = _task_list(tmp_path, "shapes_shape: {}\nimagenet1k: {name: ImageNet}\nvtab/cifar100: {}\n"
                                 "shapes_retrieval: {tags: [retrieval]}\nmine: {format: folder, path: nowhere}\n")
    with pytest.raises(EvalError) as error:
        evaluate_tasks("cc-test-teacher", str(tasks), data_root=str(tmp_path / "data"), output_dir=str(tmp_path / "o"))
    message = str(error.value)
    assert message.startswith("4 of 5 data sets missing or unusable: imagenet1k: not found under")
    for part in ("wds_imagenet1k, wds_imagenet1k_test", "vtab/cifar100: not found", "wds_vtab-cifar100",
                 "shapes_retrieval: not found", "mine: no image folder"):
        assert part in message
    assert "\n" not in message
    wrong_classes = _task_list(tmp_path, "shapes_shape: {num_classes: 7}\n")
    with pytest.raises(EvalError, match="says num_classes 7, .* has 5 class names"):
        evaluate_tasks("cc-test-teacher", str(wrong_classes), data_root=str(tmp_path / "data"),
                       output_dir=str(tmp_path / "o"))
    shape_as_retrieval = _task_list(tmp_path, "shapes_shape: {task: zeroshot_retrieval}\n")
    with pytest.raises(EvalError, match="holds a classification set, the task list says zeroshot_retrieval"):
        evaluate_tasks("cc-test-teacher", str(shape_as_retrieval), data_root=str(tmp_path / "data"),
                       output_dir=str(tmp_path / "o"))
    monkeypatch.undo()
    wrong_size = _task_list(tmp_path, "shapes_shape: {size: 5, num_classes: 5}\n")
    with pytest.raises(EvalError, match="says size 5, .* holds 4 samples"):
        evaluate_tasks("cc-test-teacher", str(wrong_size), data_root=str(tmp_path / "data"),
                       output_dir=str(tmp_path / "o"), progress=False)
    with pytest.raises(EvalError, match="needs --output-dir"):
        evaluate_tasks("cc-test-teacher", str(_task_list(tmp_path, "shapes_shape: {}\n")),
                       data_root=str(tmp_path / "data"))


def test_tasks_that_cannot_be_scored_are_skipped_and_the_mean_says_over_what(tmp_path, caplog):
    """A list with DataComp's fairness/ and WILDS group-metric tasks is evaluated: one warning line names the skipped
    tasks, summary.json records them and says its mean is over the tasks scored (not DataComp's average)."""
    from compress.data.benchmark_export import export_synthetic

    export_synthetic(tmp_path / "data", num_samples=4, tasks=("shape",), retrieval=False)
    tasks = _task_list(tmp_path, "shapes_shape: {name: Shapes}\nfairness/fairface: {name: FairFace}\n"
                                 "wilds/fmow: {name: FMoW, main_metric: acc_worst_region}\n")
    with caplog.at_level("WARNING"):
        summary = evaluate_tasks("cc-test-teacher", str(tasks), data_root=str(tmp_path / "data"),
                                 output_dir=str(tmp_path / "o"), progress=False, num_workers=0)
    warned = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warned) == 1 and "2 of 3 tasks skipped" in warned[0] and "fairness/fairface" in warned[0]
    assert summary["tasks"] == ["shapes_shape"] and list(summary["tasks_skipped"]) == ["fairness/fairface",
                                                                                      "wilds/fmow"]
    assert (summary["tasks_scored"], summary["tasks_in_list"]) == (1, 3) and "mean_main_metric" not in summary
    assert summary["mean_main_metric_scored"] == summary["main_metrics"]["shapes_shape"]
    assert summary["mean_over"] == "the main metric's mean over the 1 tasks scored of the 3 in the task list"
    assert not any(k.startswith("throughput/") for k in summary["metrics"])  # throughput off unless asked
    from analysis.benchmark import load_eval_results

    frame = load_eval_results(tmp_path / "o", task_list=tasks).iloc[0]
    assert (frame["tasks_listed"], frame["tasks_scored"], frame["tasks_missing"]) == (3, 1, 2)
    assert frame["mean_scored"] == pytest.approx(summary["mean_main_metric_scored"])
    assert math.isnan(frame["wilds/fmow"])


def test_eval_tasks_workers_and_throughput_defaults(monkeypatch, capsys):
    """``eval --tasks``: workers default to min(4, CPU count), throughput only with ``--throughput``."""
    from compress.evaluation import task_eval

    monkeypatch.setattr(task_eval.os, "cpu_count", lambda: 2)
    assert task_eval.default_workers() == 2
    monkeypatch.setattr(task_eval.os, "cpu_count", lambda: 64)
    assert task_eval.default_workers() == 4
    calls = []

    def fake(*args, **kwargs):
        calls.append(kwargs)
        return {"main_metrics": {"t": 0.5}, "tasks_skipped": {}, "mean_main_metric_scored": 0.5, "tasks_scored": 1,
                "tasks_in_list": 1, "output_dir": "o"}

    monkeypatch.setattr(task_eval, "evaluate_tasks", fake)
    assert main(["eval", "m", "--tasks", "t.yml"]) == 0
    assert main(["eval", "m", "--tasks", "t.yml", "--throughput", "--workers", "2"]) == 0
    assert [(c["throughput"], c["num_workers"]) for c in calls] == [(False, None), (True, 2)]
    assert "the mean over the 1 tasks scored of the 1 in the list" in capsys.readouterr().out
    assert main(["eval", "m", "--tasks", "t.yml", "--throughput", "--no-throughput"]) == 2
    assert main(["eval", "m", "--throughput"]) == 2
    assert "--throughput: only with --tasks" in capsys.readouterr().err


def test_eval_run_dir_on_a_task_list_equals_its_own_evaluation(tmp_path, capsys):
    """The run's synthetic validation sets written in clip_benchmark's format and evaluated through the
    task list give the numbers of the run's result.json (zero-shot top-1, top-5, retrieval recalls)."""
    from test_run_e2e import tiny_config

    from compress.data.benchmark_export import export_synthetic
    from compress.run import run_dir_for, run_experiment

    cfg = tiny_config(tmp_path)
    row = run_experiment(cfg)
    assert row["status"] == "completed", row.get("error")
    run_dir = run_dir_for(cfg)
    export_synthetic(tmp_path / "data", seed=0, num_samples=32, tasks=("color_shape",))
    tasks = _task_list(tmp_path, "shapes_color_shape: {name: Shapes}\nshapes_retrieval: {tags: [retrieval]}\n")
    argv = ["eval", str(run_dir), "--tasks", str(tasks), "--data-root", str(tmp_path / "data"), "--batch-size", "64",
            "--no-throughput"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "shapes_color_shape" in out and "mean" in out
    out_dir = run_dir / "eval" / "tasks"
    recorded = json.loads((run_dir / "result.json").read_text())["metrics"]
    lines = [json.loads(x) for x in (out_dir / "eval_results.jsonl").read_text().splitlines()]
    assert [x["key"] for x in lines] == ["shapes_color_shape", "shapes_retrieval"]
    cls, ret = (x["metrics"] for x in lines)
    assert cls["acc1"] == pytest.approx(recorded["zs/cs/top1"] / 100, abs=1e-7)
    assert cls["acc5"] == pytest.approx(recorded["zs/cs/top5"] / 100, abs=1e-7)
    assert cls["mean_per_class_recall"] == pytest.approx(recorded["zs/cs/mean_per_class_recall"] / 100, abs=1e-7)
    summary = json.loads((out_dir / "summary.json").read_text())
    for k in (1, 5, 10):  # the project's keys: its rule (identical captions count), as result.json
        for d in ("i2t", "t2i"):
            assert summary["metrics"][f"ret/shapes_retrieval/{d}_r{k}"] == pytest.approx(recorded[f"ret/val/{d}_r{k}"])
        # the field's files: clip_benchmark's rule (only a text's own image), never more than the project's
        assert ret[f"text_retrieval_recall@{k}"] <= recorded[f"ret/val/i2t_r{k}"] / 100 + 1e-7
        assert ret[f"image_retrieval_recall@{k}"] <= recorded[f"ret/val/t2i_r{k}"] / 100 + 1e-7
    assert not any("/row/" in key for key in summary["metrics"])
    assert ret["main_metric"] == pytest.approx((ret["text_retrieval_recall@1"] + ret["image_retrieval_recall@1"]) / 2)
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["tasks"] == ["shapes_color_shape", "shapes_retrieval"]
    assert summary["mean_main_metric_scored"] == pytest.approx((cls["acc1"] + ret["main_metric"]) / 2)
    assert (summary["tasks_scored"], summary["tasks_in_list"], summary["tasks_skipped"]) == (2, 2, {})
    from compress.rundir import model_sha256

    assert summary["model_sha256"] == model_sha256(run_dir / "model") and len(summary["model_sha256"]) == 64
    assert summary["metrics"]["zs/shapes_color_shape/top1"] == pytest.approx(recorded["zs/cs/top1"], abs=1e-5)
    from analysis.load import load_results

    row = load_results(run_dir).iloc[0]
    assert row["eval/tasks/shapes_retrieval"] == ret["main_metric"]
    assert row["eval/tasks/mean_scored"] == pytest.approx(summary["mean_main_metric_scored"])
    assert (row["eval/tasks/tasks_scored"], row["eval/tasks/tasks_in_list"]) == (2, 2)
    files = sorted(p.name for p in (out_dir / "clip_benchmark").iterdir())
    assert files == [f"shapes_color_shape__{run_dir.name}_en_zeroshot_classification.json",
                     f"shapes_retrieval__{run_dir.name}_en_zeroshot_retrieval.json"]
    assert main(["eval", str(run_dir), "--tasks", str(tasks), "--data", "synthetic"]) == 2
    assert "--data: not with --tasks" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--data-root", str(tmp_path)]) == 2
    assert "--data-root: only with --tasks" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--workers", "2"]) == 2
    assert "--workers: only with --tasks" in capsys.readouterr().err
    # two worker processes read the same samples in the same order
    assert main([*argv, "--workers", "2", "--output-dir", str(tmp_path / "workers")]) == 0
    again = (tmp_path / "workers" / "eval_results.jsonl").read_text()
    assert again == (out_dir / "eval_results.jsonl").read_text()
    # another model in the run directory (its weights changed): the old results no longer join the run's row
    weights = sorted(p for p in (run_dir / "model").iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
    with weights[0].open("ab") as f:
        f.write(b"\0")
    with pytest.warns(UserWarning, match="evaluated another model"):
        row = load_results(run_dir).iloc[0]
    assert "evaluated another model" in row["eval/tasks/skipped"] and "eval/tasks/mean_scored" not in row


def test_image_folder_and_csv_tasks_equal_plain_eval(tmp_path):
    """The project's own sets in a task list (``format: folder`` / ``csv``) give the numbers of ``clip-compress
    eval --data`` on them, also from the same images written as clip_benchmark folders."""
    import torch
    from PIL import Image

    from compress.data.benchmark_sets import write_wds_classification, write_wds_retrieval
    from compress.data.folder import FOLDER_TEMPLATES
    from compress.evaluation.standalone import evaluate_only
    from compress.models import load_model
    from compress.models.export import save_open_clip

    data = tmp_path / "data"
    colours = {"blue_thing": (0, 0, 255), "green_thing": (0, 255, 0), "red_thing": (255, 0, 0)}
    rows, images, labels = ["filepath,title"], [], []
    for label, (name, rgb) in enumerate(colours.items()):
        (data / "val" / name).mkdir(parents=True)
        for i in range(3):
            path = data / "val" / name / f"{i}.png"
            Image.new("RGB", (40, 40), tuple(min(255, c + 40 * i) for c in rgb)).save(path)
            rows.append(f"{path},a {name.replace('_', ' ')} number {i % 2}")  # captions repeat across images
            images.append(path)
            labels.append(label)
    (data / "pairs.csv").write_text("\n".join(rows) + "\n")
    torch.manual_seed(0)
    model_dir = save_open_clip(load_model("cc-test-teacher"), tmp_path / "model")
    plain_folder = evaluate_only(str(model_dir), data=str(data / "val"), throughput=False, progress=False)
    plain_csv = evaluate_only(str(model_dir), data=str(data / "pairs.csv"), throughput=False, progress=False)
    names = [n.replace("_", " ") for n in colours]
    write_wds_classification(data, "colours", images, labels, names, list(FOLDER_TEMPLATES))
    write_wds_retrieval(data, "pairs", images, [[r.split(",")[1]] for r in rows[1:]])
    tasks = _task_list(tmp_path, "folder_set: {format: folder, path: val}\npair_set: {format: csv, path: pairs.csv}\n"
                                 "colours: {}\npairs: {tags: [retrieval]}\n")
    summary = evaluate_tasks(str(model_dir), str(tasks), str(data), str(tmp_path / "out"), progress=False)
    got = summary["metrics"]
    for key in ("top1", "mean_per_class_recall"):
        assert got[f"zs/folder_set/{key}"] == pytest.approx(plain_folder[f"zs/val/{key}"], abs=1e-6)
        assert got[f"zs/colours/{key}"] == pytest.approx(plain_folder[f"zs/val/{key}"], abs=1e-6)
    for key in ("i2t_r1", "t2i_r1", "i2t_r5"):
        assert got[f"ret/pair_set/{key}"] == pytest.approx(plain_csv[f"ret/val/{key}"], abs=1e-6)
        assert got[f"ret/pairs/{key}"] == pytest.approx(plain_csv[f"ret/val/{key}"], abs=1e-6)
    assert summary["tasks"] == ["folder_set", "pair_set", "colours", "pairs"]


def test_one_way_to_a_runs_final_model(tmp_path):
    """eval, eval --tasks, export and the clip_benchmark loader find a run's model with one function
    (compress.rundir.final_model) and refuse the same runs with the same line: a run that did not complete (even
    with a model folder: an unfinished staged run's may be an earlier stage's) and a completed run without one."""
    from compress.evaluation.standalone import evaluate_only
    from compress.export.source import ExportSourceError, resolve_source
    from compress.rundir import RunModelError, final_model

    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "config.yaml").write_text("name: x\n")
    (run / "result.json").write_text(json.dumps({"status": "failed"}))
    from compress.data.benchmark_export import export_synthetic

    export_synthetic(tmp_path / "data", num_samples=4, tasks=("shape",), retrieval=False)
    tasks = _task_list(tmp_path, "shapes_shape: {}\n")
    calls = [lambda: evaluate_only(str(run), progress=False),
             lambda: evaluate_tasks(str(run), str(tasks), data_root=str(tmp_path / "data")),
             lambda: resolve_source(str(run))]
    try:
        from compress.integrations.clip_benchmark import load_clip_compress

        calls.append(lambda: load_clip_compress(str(run), ""))
    except ImportError:
        pass
    for broken, message in (({"status": "failed"}, "the run did not complete (status: failed)"),
                            ({"status": "completed"}, "the run has no exported model (model/)")):
        (run / "result.json").write_text(json.dumps(broken))
        if broken["status"] == "completed":
            (run / "model").rmdir()
        with pytest.raises(RunModelError) as error:
            final_model(run)
        assert message in str(error.value)
        for call in calls:
            with pytest.raises((EvalError, ExportSourceError, ValueError)) as error:
                call()
            assert message in str(error.value) and "\n" not in str(error.value)
