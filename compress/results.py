"""The one result row every run leaves: ``result.json`` in its run directory, written atomically; and the rows
of many runs read back (:func:`collect_rows`: run rows and stage rows, for ``collect`` and ``analysis``).
No torch import."""

from __future__ import annotations

import json
import platform
import time
import traceback
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from compress.fileio import atomic_write_text
from compress.rundir import RESULT_FILE, RunDir, find_run_dirs

#: the kind of a collected row: a run's own row, or one stage's of a staged run
ROW_RUN = "run"
ROW_STAGE = "stage"
STATUS_COMPLETED = "completed"
STATUS_FAILED = "failed"
STATUS_INTERRUPTED = "interrupted"

_PACKAGES = ("clip-compress", "torch", "open_clip_torch", "timm", "torch-pruning")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_result(run_dir: Path, row: dict[str, Any]) -> Path:
    path = RunDir(run_dir).result
    atomic_write_text(path, json.dumps(row, indent=2, sort_keys=False, default=_jsonable))
    return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def read_result(run_dir: Path) -> dict[str, Any] | None:
    path = RunDir(run_dir).result
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def make_row(
    *,
    run_id: str,
    name: str,
    status: str,
    config: dict[str, Any],
    started: float,
    metrics: dict[str, Any] | None = None,
    error: BaseException | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A flat row: identity, status, versions, duration, metrics (and the error if failed)."""
    row: dict[str, Any] = {
        "run_id": run_id,
        "name": name,
        "status": status,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "duration_s": round(time.time() - started, 3),
        "versions": versions(),
        "config": config,
        "metrics": dict(metrics or {}),
    }
    if extra:
        row.update(extra)
    if error is not None:
        row["error"] = f"{type(error).__name__}: {error}"
        row["traceback"] = "".join(traceback.format_exception(error))[-8000:]
    return row


class ResultsError(ValueError):
    """A path given to read runs from (``status``, ``collect``, ``analysis``) does not exist or holds no run."""


def result_files(root: Path) -> list[Path]:
    """The run and stage ``result.json`` files of every run under ``root`` (or ``root`` itself, a file)."""
    root = Path(root)
    if root.is_file():
        if root.name != RESULT_FILE:
            raise ResultsError(f"{root}: not a {RESULT_FILE} (give run folders, or their {RESULT_FILE} files)")
        return [root]
    files = []
    for run_dir in map(RunDir, find_run_dirs(root)):
        files += [p for p in [run_dir.result] if p.is_file()]
        files += sorted(run_dir.stages_root.glob(f"*/{RESULT_FILE}"))
    return files


def row_kind(result_file: Path) -> str:
    """``stage`` for ``.../stages/K-NAME/result.json``, else ``run``."""
    return ROW_STAGE if RunDir(result_file.parent).stage_of() is not None else ROW_RUN


def collect_rows(paths: Sequence[Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows under ``paths`` (sorted by path, each file once), each with ``"row"`` (:func:`row_kind`) and
    ``"path"`` (its folder) added, and one line per unreadable file. A path that does not exist or holds no
    ``result.json`` raises :class:`ResultsError`."""
    files: dict[Path, Path] = {}
    for path in map(Path, paths):
        if not path.exists():
            raise ResultsError(f"{path}: no such file or directory")
        found = result_files(path)
        if not found:
            raise ResultsError(
                f"{path}: holds no {RESULT_FILE} (no run there has finished, failed or been interrupted)")
        for file in found:
            files.setdefault(file.resolve(), file)
    rows: list[dict[str, Any]] = []
    unreadable: list[str] = []
    for file in sorted(files.values(), key=str):
        try:
            row = json.loads(file.read_text())
            if not isinstance(row, dict):
                raise ValueError(f"a JSON {type(row).__name__}, not an object")
        except (OSError, ValueError) as error:
            unreadable.append(f"{file}: {error}")
            continue
        rows.append({**row, "row": row_kind(file), "path": str(file.parent)})
    return rows, unreadable
