"""Every exported student loads in clip_benchmark (1.6.2) and its numbers equal this project's evaluation.

A tiny clip_benchmark-format set on disk (a classification set and a retrieval set with distinct captions,
written by ``compress.data.benchmark_sets``), an exported uniform student (open_clip's layout) and an
automatically pruned (non-uniform) one, evaluated by clip_benchmark's own evaluate functions in process, by
its CLI (``clip-compress-benchmark``, in process) and by ``clip-compress eval --tasks`` (in process): equal
top-1, top-5, mean per-class recall and recalls."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

pytest.importorskip("clip_benchmark", reason="clip_benchmark is in the eval extra (pip install 'clip-compress[eval]')")

from compress.data.benchmark_sets import write_wds_classification, write_wds_retrieval  # noqa: E402
from compress.integrations import clip_benchmark as cb  # noqa: E402
from compress.models import load_model  # noqa: E402
from compress.models.export import save_model, save_open_clip  # noqa: E402
from compress.models.nonuniform import is_nonuniform_folder  # noqa: E402
from compress.models.pad import pad_to_uniform  # noqa: E402
from compress.registry import INHERITANCE  # noqa: E402

CLASSES = ["red circle", "green square", "blue triangle", "yellow star", "purple ring", "orange cross"]
TEMPLATES = ["a photo of a {c}.", "a drawing of the {c}."]
N_CLS, N_RET, BATCH = 30, 12, 8
RECALL_K = (1, 5)


def _images(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("benchmark")
    labels = [i % len(CLASSES) for i in range(N_CLS)]
    write_wds_classification(root, "tiny_cls", _images(N_CLS, 0), labels, CLASSES, TEMPLATES, shard_size=7)
    captions = [[f"a picture number {i} of a {CLASSES[i % 6]}"] + ([f"image {i}, seen twice"] if i % 3 == 0 else [])
                for i in range(N_RET)]
    flat = [c for cs in captions for c in cs]
    assert len(set(flat)) == len(flat)  # distinct captions: no tie decides a recall
    write_wds_retrieval(root, "tiny_ret", _images(N_RET, 1), captions, shard_size=5)
    return root


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A uniform student (open_clip's layout) and an automatically pruned one (``auto`` inheritance's export:
    per-layer heads and MLP widths, residual channels pruned: this project's non-uniform format)."""
    out = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    teacher = load_model("cc-test-teacher")
    uniform = save_model(copy.deepcopy(teacher), out / "uniform")
    strategy = INHERITANCE.build({"name": "auto", "prune_step": 1000})
    student = strategy.inherit(None, teacher)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for tower in student.structure_masks.towers.values():
            for gates in tower.gate_modules():
                gates.log_alpha.uniform_(math.log(0.05), math.log(20.0), generator=generator)
    pruned = save_model(strategy.export(student), out / "pruned")
    assert not is_nonuniform_folder(uniform) and is_nonuniform_folder(pruned)
    structure = json.loads((pruned / "clip_compress_config.json").read_text())["structure"]
    assert len(set(structure["vision"]["heads"])) > 1 and structure["vision"]["width"] < 64
    with torch.no_grad():  # residual channels kept: pad_to_uniform gives the open_clip form of the student
        for tower in student.structure_masks.towers.values():
            tower.channels.log_alpha.fill_(math.log(20.0))
    kept = strategy.export(student)
    return {"uniform": uniform, "pruned": pruned, "kept_width": save_model(kept, out / "kept_width"),
            "padded": save_open_clip(pad_to_uniform(kept), out / "padded")}


TASK_LIST = "tiny_cls: {name: Tiny classes}\ntiny_ret: {name: Tiny retrieval, task: zeroshot_retrieval}\n"
_PROJECT: dict[tuple[str, str], dict[str, float]] = {}


def _project_metrics(folder: Path, root: Path) -> dict[str, float]:
    """This project's evaluation, ``clip-compress eval FOLDER --tasks LIST --data-root ROOT`` (its own loader,
    reader of clip_benchmark's format, transform and metrics), read from the DataComp ``eval_results.jsonl``
    it writes: fractions in clip_benchmark's names (``image_retrieval_recall@k`` is text -> image, the
    project's ``t2i``; ``text_retrieval_recall@k`` image -> text, ``i2t``). Computed once per model."""
    from experiments.cli import main

    key = (str(folder), str(root))
    if key not in _PROJECT:
        tasks, out = root / "tasks.yml", folder.parent / f"eval_{folder.name}"
        tasks.write_text(TASK_LIST)
        argv = ["eval", str(folder), "--tasks", str(tasks), "--data-root", str(root), "--output-dir", str(out),
                "--device", "cpu", "--batch-size", str(BATCH), "--no-throughput"]
        assert main(argv) == 0
        rows = {r["key"]: r["metrics"] for r in map(json.loads, (out / "eval_results.jsonl").read_text().splitlines())}
        metrics = {k: rows["tiny_cls"][k] for k in ("acc1", "acc5", "mean_per_class_recall")}
        for k in RECALL_K:
            for direction in ("image", "text"):
                metrics[f"{direction}_retrieval_recall@{k}"] = rows["tiny_ret"][f"{direction}_retrieval_recall@{k}"]
        _PROJECT[key] = metrics
    return dict(_PROJECT[key])


def _clip_benchmark_metrics(model: nn.Module, transform: Any, tokenizer: Any, root: Path) -> dict[str, float]:
    """clip_benchmark's own data set builder and evaluate functions, as its CLI calls them (webdataset batches,
    amp off: the comparison is in fp32)."""
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval

    def loader(name: str, task: str) -> tuple[Any, DataLoader]:
        ds = build_dataset(f"wds/{name}", root=str(root / f"wds_{name}"), transform=transform, task=task)
        return ds, DataLoader(ds.batched(BATCH), batch_size=None, shuffle=False, num_workers=0)

    ds, dl = loader("tiny_cls", "zeroshot_classification")
    metrics = zeroshot_classification.evaluate(model, dl, tokenizer, ds.classes, ds.templates, device="cpu", amp=False)
    _, dl = loader("tiny_ret", "zeroshot_retrieval")
    metrics.update(zeroshot_retrieval.evaluate(model, dl, tokenizer, device="cpu", amp=False,
                                               recall_k_list=list(RECALL_K)))
    return metrics


def _assert_equal(ours: dict[str, float], theirs: dict[str, float], sizes: dict[str, int]) -> None:
    """Equal numbers: the same count of correct samples (fractions of ``sizes[metric]`` samples)."""
    for key, value in ours.items():
        if key != "mean_per_class_recall":  # a mean of per-class rates, not a count over the samples
            n = sizes["cls" if key.startswith("acc") else "t2i" if key.startswith("image") else "i2t"]
            assert round(value * n) == round(theirs[key] * n), (key, value, theirs[key])
        assert value == pytest.approx(theirs[key], abs=1e-6), key


SIZES = {"cls": N_CLS, "t2i": N_RET + 4, "i2t": N_RET}  # 16 captions: images 0, 3, 6, 9 have two


@pytest.mark.parametrize("kind", ["uniform", "pruned"])
def test_clip_benchmark_evaluate_functions_equal_the_projects_evaluation(data_root, exports, kind) -> None:
    cb.register()
    model, transform, tokenizer = cb.load_clip_compress(str(exports[kind]), "", None, "cpu")
    theirs = _clip_benchmark_metrics(model, transform, tokenizer, data_root)
    ours = _project_metrics(exports[kind], data_root)
    _assert_equal(ours, theirs, SIZES)
    assert 0 < theirs["acc5"] and theirs["acc1"] < theirs["acc5"]  # not a degenerate answer
    if kind == "uniform":  # open_clip's own loader (clip_benchmark's default type) gives the same numbers
        from clip_benchmark.models import load_clip

        loaded = load_clip("open_clip", f"local-dir:{exports[kind]}", "", None, "cpu")
        _assert_equal(ours, _clip_benchmark_metrics(*loaded, data_root), SIZES)


@pytest.mark.slow
def test_a_padded_non_uniform_student_loads_in_open_clips_own_type(data_root, exports) -> None:
    """The other way in: ``pad_to_uniform`` (zero heads and neurons) writes a non-uniform student whose
    residual width was kept in open_clip's layout; clip_benchmark's default ``open_clip`` type evaluates it
    with the numbers this project gives the non-uniform export."""
    from clip_benchmark.models import load_clip

    cb.register()
    assert is_nonuniform_folder(exports["kept_width"])
    loaded = load_clip("open_clip", f"local-dir:{exports['padded']}", "", None, "cpu")
    _assert_equal(_project_metrics(exports["kept_width"], data_root), _clip_benchmark_metrics(*loaded, data_root),
                  SIZES)


def _cli(argv: list[str], out: Path) -> dict[str, Any]:
    assert cb.main([*argv, "--output", str(out), "--no_amp", "--num_workers", "0", "--batch_size", str(BATCH),
                    "--quiet"]) == 0
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["uniform", "pruned"])
def test_clip_benchmark_cli_equals_the_projects_evaluation(data_root, exports, kind, tmp_path) -> None:
    """``clip-compress-benchmark eval`` (clip_benchmark's CLI, ``--model_type clip_compress`` and an empty
    ``--pretrained`` by default) writes clip_benchmark's result JSON with the project's numbers."""
    model = str(exports[kind])
    cls = _cli(["eval", "--dataset", "wds/tiny_cls", "--dataset_root", str(data_root / "wds_tiny_cls"),
                "--model", model], tmp_path / "cls.json")
    ret = _cli(["eval", "--dataset", "wds/tiny_ret", "--dataset_root", str(data_root / "wds_{dataset_cleaned}"),
                "--task", "zeroshot_retrieval", "--recall_k", *map(str, RECALL_K), "--model", model],
               tmp_path / "ret.json")
    assert {k: cls[k] for k in ("dataset", "model", "pretrained", "task", "language")} == {
        "dataset": "wds/tiny_cls", "model": model, "pretrained": "", "task": "zeroshot_classification",
        "language": "en"}
    assert ret["task"] == "zeroshot_retrieval"
    _assert_equal(_project_metrics(exports[kind], data_root), {**cls["metrics"], **ret["metrics"]}, SIZES)


@pytest.mark.slow
def test_a_project_model_name_with_a_checkpoint_file(data_root, exports, tmp_path) -> None:
    """``--model cc-test-teacher --pretrained FILE``: a name only this project registers (open_clip in a
    clip_benchmark process does not know it), weights from a plain state-dict file (no config inside): the
    numbers of the same weights exported."""
    from compress.models.build import save_safetensors

    weights = tmp_path / "teacher.safetensors"
    save_safetensors(load_model(str(exports["uniform"])).state_dict(), weights)
    named = _cli(["eval", "--dataset", "wds/tiny_cls", "--dataset_root", str(data_root / "wds_{dataset}"),
                  "--model", "cc-test-teacher", "--pretrained", str(weights)], tmp_path / "named.json")
    assert named["model"] == "cc-test-teacher" and named["pretrained"] == str(weights)
    ours = _project_metrics(exports["uniform"], data_root)
    _assert_equal({k: ours[k] for k in ("acc1", "acc5", "mean_per_class_recall")}, named["metrics"], SIZES)


def test_repeated_captions_field_files_hold_clip_benchmarks_numbers(exports, tmp_path) -> None:
    """A retrieval set whose captions repeat across images: the clip_benchmark JSON and the DataComp line hold
    clip_benchmark's own numbers (its ``zeroshot_retrieval.evaluate``: only a text's own image counts), while
    summary.json's project keys follow the project's rule (identical captions count), from the same features."""
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_retrieval

    from compress.data.transforms import eval_transform_for
    from compress.evaluation.retrieval import encode_retrieval_set, recall_at_k
    from compress.evaluation.task_sets import build_task_set, resolve_sources
    from compress.models.forward import tokenizer_for
    from compress.tasklist import load_task_list
    from experiments.cli import main

    root, ks = tmp_path / "data", (1, 5, 10)
    # 4 captions, each describing 3 of the 12 images; odd images also have a caption of their own
    captions = [[f"a {CLASSES[i % 4]}"] + ([f"picture {i}"] if i % 2 else []) for i in range(N_RET)]
    write_wds_retrieval(root, "tiny_dup", _images(N_RET, 2), captions, shard_size=5)
    tasks = tmp_path / "tasks.yml"
    tasks.write_text("tiny_dup: {task: zeroshot_retrieval}\n")
    folder, out = exports["uniform"], tmp_path / "out"
    assert main(["eval", str(folder), "--tasks", str(tasks), "--data-root", str(root), "--output-dir", str(out),
                 "--device", "cpu", "--batch-size", str(BATCH), "--workers", "0"]) == 0
    (file,) = (out / "clip_benchmark").iterdir()
    field = json.loads(file.read_text())["metrics"]
    line = json.loads((out / "eval_results.jsonl").read_text())["metrics"]
    project = json.loads((out / "summary.json").read_text())["metrics"]

    cb.register()
    model, transform, tokenizer = cb.load_clip_compress(str(folder), "", None, "cpu")
    ds = build_dataset("wds/tiny_dup", root=str(root / "wds_tiny_dup"), transform=transform, task="zeroshot_retrieval")
    theirs = zeroshot_retrieval.evaluate(model, DataLoader(ds.batched(BATCH), batch_size=None, num_workers=0),
                                         tokenizer, device="cpu", amp=False, recall_k_list=list(ks))
    n_texts = sum(map(len, captions))
    _assert_equal(field, theirs, {"t2i": n_texts, "i2t": N_RET})  # the same counts of correct answers
    _assert_equal({k: line[k] for k in theirs}, theirs, {"t2i": n_texts, "i2t": N_RET})

    (source,) = resolve_sources(load_task_list(tasks), root)
    built = build_task_set(source, eval_transform_for(model), tokenizer_for(model), BATCH)
    img, txt, t2i, ids = encode_retrieval_set(model, built.retrieval.loader)
    both = recall_at_k(img, txt, t2i, ks, text_ids=ids, row_rule=True)
    for k in ks:
        for d in ("i2t", "t2i"):
            assert project[f"ret/tiny_dup/{d}_r{k}"] == pytest.approx(both[f"{d}_r{k}"]), (d, k)
        assert field[f"text_retrieval_recall@{k}"] == pytest.approx(both[f"row/i2t_r{k}"] / 100)
        assert field[f"image_retrieval_recall@{k}"] == pytest.approx(both[f"row/t2i_r{k}"] / 100)
    assert project["ret/tiny_dup/t2i_r1"] > 100 * field["image_retrieval_recall@1"]  # the repeats count here only
