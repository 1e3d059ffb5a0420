"""The one result row every run leaves: ``result.json`` in its run directory, written atomically."""

from __future__ import annotations

import json
import platform
import time
import traceback
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from compress.fileio import atomic_write_text

RESULT_FILE = "result.json"
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
    path = Path(run_dir) / RESULT_FILE
    atomic_write_text(path, json.dumps(row, indent=2, sort_keys=False, default=_jsonable))
    return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def read_result(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / RESULT_FILE
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
