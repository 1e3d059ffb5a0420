"""Task lists in DataComp's ``tasklist.yml`` format: which evaluation sets a model is judged on, of
which kind, by which main metric (Gadre et al. 2023, DataComp; its 38 tasks are evaluated with
clip_benchmark). No torch import: ``analysis`` reads task lists too.

A task list is a YAML mapping ``key -> entry``; DataComp's own file is read as is::

    imagenet1k:                       # the key: the clip_benchmark data set name (wds/imagenet1k)
      name: ImageNet 1k               # the display name (DataComp's eval_results.jsonl "dataset")
      main_metric: acc1               # default acc1 (classification), mean_recall@1 (retrieval)
      num_classes: 1000               # checked against classnames.txt before the model loads
      size: 50000                     # checked against the set's samples before evaluating
      tags: [val_task]                # DataComp's time and random_score are kept, not used
    retrieval/flickr30k:              # a key under retrieval/ (or the tag "retrieval") is retrieval
      name: Flickr
      main_metric: mean_recall@1
      dataset: flickr30k              # this project's addition: the data set to read, when not the key

This project's optional fields: ``task`` (``zeroshot_classification`` | ``zeroshot_retrieval``, the
kind when the key does not tell), ``dataset`` (the clip_benchmark set name, default the key),
``format`` (``wds``: a clip_benchmark webdataset folder under the data root, the default;
``folder``: an image folder in the ImageNet layout, classification; ``csv``: a CSV / TSV of
image-text pairs, retrieval), ``path`` (the folder or file; relative paths are taken from the
data root), ``classnames`` and ``templates`` (``{c}`` placeholders; override the set's own),
``image_key`` / ``caption_key`` / ``separator`` for a CSV.

DataComp's own ``tasklist.yml`` (40 entries) is read as is (:func:`read_task_list`): its tasks this
evaluator cannot score are SKIPPED, not refused: ``fairness/`` and ``misc/`` tasks (group metrics,
WinoGAViL's Jaccard score) and ``wilds/`` tasks whose main metric is a WILDS group metric (iWildCam's
``F1-macro_all``, FMoW's ``acc_worst_region``). A ``wilds/`` task whose main metric is plain
classification (Camelyon17: DataComp's default ``acc1``, computed by the same ``evaluate_webdataset``
as the other sets) is scored as zero-shot classification. Skipped tasks count as missing in every mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CLASSIFICATION = "zeroshot_classification"
RETRIEVAL = "zeroshot_retrieval"
TASK_KINDS = (CLASSIFICATION, RETRIEVAL)
FORMATS = ("wds", "folder", "csv")
#: the recall@k reported for retrieval (DataComp's list)
RECALL_KS = (1, 5, 10)
#: the metrics each kind reports, in clip_benchmark's names (fractions); main_metric is one of them
METRICS = {
    CLASSIFICATION: ("acc1", "acc5", "mean_per_class_recall"),
    RETRIEVAL: tuple(f"{d}_retrieval_recall@{k}" for k in RECALL_KS for d in ("image", "text"))
    + ("mean_recall@1",),
}
DEFAULT_MAIN = {CLASSIFICATION: "acc1", RETRIEVAL: "mean_recall@1"}
#: DataComp's key prefixes of tasks that are skipped (fairness/, misc/) or scored only when their main metric is
#: a plain classification metric (wilds/: Camelyon17's acc1, not iWildCam's F1-macro_all or FMoW's worst region)
SKIPPED_PREFIXES = ("fairness/", "misc/")
WILDS_PREFIX = "wilds/"
#: the fields read here; DataComp's others (size, time, num_classes, random_score, tags) are kept in ``extra``
_FIELDS = {"name", "main_metric", "task", "dataset", "format", "path", "classnames", "templates",
           "image_key", "caption_key", "separator", "tags"}


class TaskListError(ValueError):
    """A task list that cannot be used (printed as one line)."""


class SkippedTask(TaskListError):
    """A task of DataComp's list that this evaluator cannot score (skipped, counted as missing)."""


@dataclass
class TaskSpec:
    """One task of a task list (see the module docstring for the fields)."""

    key: str
    name: str
    kind: str
    main_metric: str
    dataset: str
    format: str = "wds"
    path: str | None = None
    classnames: list[str] | None = None
    templates: list[str] | None = None
    csv: dict[str, str] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def _kind(key: str, entry: dict[str, Any], fmt: str) -> str:
    if entry.get("task") is not None:
        if entry["task"] not in TASK_KINDS:
            raise TaskListError(f"task {key!r}: task {entry['task']!r} is not one of {', '.join(TASK_KINDS)}")
        return str(entry["task"])
    tags = entry.get("tags") or []
    if key.startswith("retrieval/") or "retrieval" in tags or fmt == "csv":
        return RETRIEVAL
    return CLASSIFICATION


def _strings(key: str, entry: dict[str, Any], name: str) -> list[str] | None:
    value = entry.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise TaskListError(f"task {key!r}: {name} must be a non-empty list of strings")
    return list(value)


def parse_task(key: str, entry: Any) -> TaskSpec:
    """One entry of a task list as a :class:`TaskSpec`."""
    if entry is None:
        entry = {}
    if not isinstance(entry, dict):
        raise TaskListError(f"task {key!r}: an entry must be a mapping, got {type(entry).__name__}")
    if key.startswith(SKIPPED_PREFIXES):
        raise SkippedTask(f"DataComp's {key.split('/')[0]}/ tasks are not plain zero-shot classification or retrieval")
    main_given = entry.get("main_metric")
    if key.startswith(WILDS_PREFIX) and main_given is not None and main_given not in METRICS[CLASSIFICATION]:
        raise SkippedTask(f"main metric {main_given} is a WILDS group metric")
    fmt = str(entry.get("format", "wds"))
    if fmt not in FORMATS:
        raise TaskListError(f"task {key!r}: format {fmt!r} is not one of {', '.join(FORMATS)}")
    kind = _kind(key, entry, fmt)
    if (fmt, kind) in (("folder", RETRIEVAL), ("csv", CLASSIFICATION)):
        raise TaskListError(f"task {key!r}: a {fmt} set is not a {kind} task")
    if fmt != "wds" and not entry.get("path"):
        raise TaskListError(f"task {key!r}: format {fmt} needs a path")
    main = str(entry.get("main_metric") or DEFAULT_MAIN[kind])
    if main not in METRICS[kind]:
        raise TaskListError(f"task {key!r}: main_metric {main!r} is not a {kind} metric "
                            f"({', '.join(METRICS[kind])})")
    templates = _strings(key, entry, "templates")
    if templates and not all("{c}" in t or "{}" in t for t in templates):
        raise TaskListError(f"task {key!r}: templates need a '{{c}}' placeholder")
    csv = {k: str(entry[k]) for k in ("image_key", "caption_key", "separator") if entry.get(k) is not None}
    if csv and fmt != "csv":
        raise TaskListError(f"task {key!r}: {', '.join(csv)} only for format csv")
    return TaskSpec(
        key=key, name=str(entry.get("name") or key), kind=kind, main_metric=main,
        dataset=str(entry.get("dataset") or key), format=fmt,
        path=str(entry["path"]) if entry.get("path") else None,
        classnames=_strings(key, entry, "classnames"), templates=templates, csv=csv,
        tags=list(entry.get("tags") or []), extra={k: v for k, v in entry.items() if k not in _FIELDS},
    )


@dataclass
class TaskList:
    """A task list as read: the tasks to evaluate (file order), the skipped ones (key -> why) and every key."""

    tasks: list[TaskSpec]
    skipped: dict[str, str]
    keys: list[str]

    @property
    def total(self) -> int:
        """The number of tasks the list holds (scored or skipped)."""
        return len(self.keys)

    def skipped_line(self) -> str | None:
        """The one warning line naming the skipped tasks, or ``None``."""
        if not self.skipped:
            return None
        return (f"{len(self.skipped)} of {self.total} tasks skipped (not scored by this evaluator, counted as "
                f"missing): " + "; ".join(f"{k} ({why})" for k, why in self.skipped.items()))


def load_task_list(path: str | Path) -> list[TaskSpec]:
    """The tasks to evaluate of a task list file, in file order (:func:`read_task_list`; skipped tasks left out)."""
    return read_task_list(path).tasks


def read_task_list(path: str | Path) -> TaskList:
    """A task list file (every problem refused before anything runs; DataComp's tasks this evaluator cannot
    score are skipped, the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise TaskListError(f"--tasks: no such task list: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise TaskListError(f"{path}: not YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict) or not data:
        raise TaskListError(f"{path}: a task list is a mapping of task keys to entries (DataComp's tasklist.yml)")
    tasks, skipped = [], {}
    for key, entry in data.items():
        try:
            tasks.append(parse_task(str(key), entry))
        except SkippedTask as why:
            skipped[str(key)] = str(why)
        except TaskListError as error:
            raise TaskListError(f"{path}: {error}") from None
    if not tasks:
        raise TaskListError(f"{path}: no task this evaluator can score (skipped: {', '.join(skipped)})")
    for what, values, why in (("names", [t.name for t in tasks], "DataComp keys its results by name"),
                              ("keys with / written -", [t.key.replace("/", "-") for t in tasks], "metric names")):
        dup = sorted({v for v in values if values.count(v) > 1})
        if dup:
            raise TaskListError(f"{path}: task {what} must differ ({why}): {dup}")
    return TaskList(tasks, skipped, [str(k) for k in data])
