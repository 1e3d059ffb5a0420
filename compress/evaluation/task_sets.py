"""A task list's data sets found on disk (before any model is loaded) and built as evaluation sets.

:func:`resolve_sources` looks every task's data up under the data root and refuses, in ONE error,
every set that is missing or unusable, so a long evaluation never stops at its 30th task for a typo.
:func:`build_task_set` turns a resolved task into the project's :class:`ZeroShotTask` or
:class:`RetrievalSet` (clip_benchmark webdataset folder, image folder, or CSV of pairs) and returns
the class-name and template hashes recorded with the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.config import DatasetConfig, ZeroShotTaskConfig
from compress.data.benchmark_sets import WdsEvalSet, candidate_dirs, locate, read_wds_info
from compress.data.collate import make_captions_collate, make_label_collate
from compress.data.csv_data import MissingColumns, read_pairs
from compress.data.loader import build_eval_loader
from compress.data.robust import DataError
from compress.data.tasks import RetrievalSet, ZeroShotTask, build_retrieval_set, build_zero_shot_task
from compress.result_files import lines_sha256, template_hash
from compress.tasklist import CLASSIFICATION, RECALL_KS, RETRIEVAL, TaskListError, TaskSpec


@dataclass
class TaskSource:
    """A task and where its data is: a clip_benchmark folder, an image folder or a CSV file."""

    task: TaskSpec
    path: Path

    @property
    def set_name(self) -> str:
        """The task's name in the project's metric keys (``zs/<set_name>/top1``): the key, ``/`` as ``-``."""
        return self.task.key.replace("/", "-")


def _given_path(task: TaskSpec, data_root: Path | None) -> Path:
    path = Path(task.path).expanduser()  # type: ignore[arg-type]
    return path if path.is_absolute() or data_root is None else data_root / path


def _problem(task: TaskSpec, data_root: Path | None) -> tuple[Path | None, str | None]:
    """(the task's data, None) or (None, why it cannot be used)."""
    if task.format == "wds":
        if task.path:
            path = _given_path(task, data_root)
        elif data_root is None:
            return None, "no --data-root to look for it under"
        else:
            path = locate(data_root, task.dataset)
            if path is None:
                looked = ", ".join(p.name for p in candidate_dirs(data_root, task.dataset))
                return None, f"not found under {data_root} (looked for {looked})"
        try:
            info = read_wds_info(path)
        except DataError as error:
            return None, str(error)
        if (info.kind == "retrieval") != (task.kind == RETRIEVAL):
            return None, f"{path} holds a {info.kind} set, the task list says {task.kind}"
        if task.kind == CLASSIFICATION and not (task.classnames or info.classnames):
            return None, f"{path} has no classnames.txt (and the task list gives no classnames)"
        if task.kind == CLASSIFICATION and not (task.templates or info.templates):
            return None, f"{path} has no zeroshot_classification_templates.txt (and the task list gives no templates)"
        return path, None
    path = _given_path(task, data_root)
    if task.format == "folder" and not path.is_dir():
        return None, f"no image folder {path}"
    if task.format == "csv":
        try:
            read_pairs(path, **_csv_keys(task), nrows=0)
        except (DataError, MissingColumns) as error:
            return None, str(error)
    return path, None


def _csv_keys(task: TaskSpec) -> dict[str, str]:
    keys = {"image_key": DatasetConfig.image_key, "caption_key": DatasetConfig.caption_key,
            "separator": "\t" if str(task.path).endswith(".tsv") else DatasetConfig.separator}
    return {**keys, **task.csv}


def resolve_sources(tasks: list[TaskSpec], data_root: str | Path | None) -> list[TaskSource]:
    """Where each task's data is; every missing or unusable set named in one :class:`TaskListError`."""
    root = Path(data_root).expanduser() if data_root is not None else None
    if root is not None and not root.is_dir():
        raise TaskListError(f"--data-root: no such folder: {data_root}")
    found, problems = [], []
    for task in tasks:
        path, problem = _problem(task, root)
        if problem is not None:
            problems.append(f"{task.key}: {problem}")
        else:
            found.append(TaskSource(task, path))  # type: ignore[arg-type]
    if problems:
        raise TaskListError(f"{len(problems)} of {len(tasks)} data sets missing or unusable: " + "; ".join(problems))
    return found


@dataclass
class BuiltSet:
    """A task's evaluation set and the hashes of what the model was asked."""

    source: TaskSource
    zero_shot: ZeroShotTask | None = None
    retrieval: RetrievalSet | None = None
    templates_sha256: str | None = None
    classnames_sha256: str | None = None
    num_samples: int | None = None


def _wds_set(source: TaskSource, transform: Any, tokenizer: Any, batch_size: int, workers: int) -> BuiltSet:
    task, name = source.task, source.set_name
    ds = WdsEvalSet(source.path, transform)
    if task.kind == RETRIEVAL:
        loader = build_eval_loader(ds, batch_size, make_captions_collate(tokenizer), workers, f"retrieval:{name}")
        return BuiltSet(source, retrieval=RetrievalSet(name, loader, ks=RECALL_KS), num_samples=len(ds))
    classnames = task.classnames or ds.info.classnames or []
    if task.classnames and ds.info.classnames and len(task.classnames) != len(ds.info.classnames):
        raise DataError(f"task {task.key}: {len(task.classnames)} class names given, {source.path} has "
                        f"{len(ds.info.classnames)}")
    templates = [t.replace("{c}", "{}") for t in (task.templates or ds.info.templates or [])]
    loader = build_eval_loader(ds, batch_size, make_label_collate(), workers, f"zero-shot:{name}")
    zs = ZeroShotTask(name, loader, classnames, templates, info={"path": str(source.path)})
    return BuiltSet(source, zero_shot=zs, templates_sha256=template_hash(templates),
                    classnames_sha256=lines_sha256(classnames), num_samples=len(ds))


def build_task_set(source: TaskSource, transform: Any, tokenizer: Any, batch_size: int = 128,
                   num_workers: int = 0) -> BuiltSet:
    """The evaluation set of one resolved task (its loader reads the data in order)."""
    task, name = source.task, source.set_name
    if task.format == "wds":
        return _wds_set(source, transform, tokenizer, batch_size, num_workers)
    if task.format == "folder":
        cfg = ZeroShotTaskConfig(name=name, kind="folder", path=str(source.path), classnames=task.classnames,
                                 templates=task.templates)
        zs = build_zero_shot_task(cfg, transform, None, batch_size, num_workers)
        return BuiltSet(source, zero_shot=zs, templates_sha256=template_hash([str(t) for t in zs.templates]),
                        classnames_sha256=lines_sha256(zs.classnames), num_samples=len(zs.dataset or []))
    cfg = DatasetConfig(kind="csv", path=str(source.path), split="val", **_csv_keys(task))
    ret = build_retrieval_set(cfg, transform, name, tokenizer=tokenizer, batch_size=batch_size,
                              num_workers=num_workers)
    ret.ks = RECALL_KS  # type: ignore[union-attr]
    return BuiltSet(source, retrieval=ret, num_samples=len(ret.dataset or []))  # type: ignore[union-attr]
