"""What ``clip-compress export`` is given: a finished run directory (its exported student, its config and its
result row, for the model card) or a model (an exported folder, a checkpoint, ``name@tag``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.rundir import RunDir, RunModelError, final_model


class ExportSourceError(ValueError):
    """A model or run directory that cannot be exported (printed as one line)."""


@dataclass(frozen=True)
class ExportSource:
    """``model``: what :func:`compress.models.load_model` reads; ``run_dir``, ``row``: the run it came from
    and its ``result.json`` row (``None`` for a model given directly); ``name``: for titles and file names."""

    model: str
    name: str
    run_dir: Path | None = None
    row: dict[str, Any] | None = None


def _read_row(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError as e:
        raise ExportSourceError(f"{path}: not valid JSON: {e}") from None


def resolve_source(arg: str) -> ExportSource:
    """A run directory (it holds ``config.yaml``) gives its completed student (a staged run: its last stage's)
    and its result row; anything else is a model string, refused when it names an architecture without
    weights (exporting random weights is never meant)."""
    path = Path(arg.removeprefix("local-dir:"))
    layout = RunDir(path)
    if path.is_dir() and layout.config.is_file():
        try:
            model_dir = final_model(path)  # a staged run: its last stage's student
        except RunModelError as error:
            raise ExportSourceError(f"{error}; nothing to export") from None
        row = _read_row(layout.result) or {}
        final = RunDir(model_dir.parent)
        if final != layout and not row.get("metrics"):
            row = {**row, "metrics": (_read_row(final.result) or {}).get("metrics", {})}
        return ExportSource(str(model_dir), f"{row.get('name', path.name)}-{row.get('run_id', '')}".rstrip("-"),
                            path, row)
    from compress.models.factory import has_weights

    if not path.exists() and ("/" in arg or path.suffix):
        raise ExportSourceError(f"{arg}: no such file or folder")
    if not has_weights(arg):
        raise ExportSourceError(f"{arg}: an architecture without weights; give a run directory, an exported "
                                "model folder, a checkpoint or name@tag")
    return ExportSource(arg, path.stem if path.exists() else arg.replace("/", "-").replace("@", "-"))
