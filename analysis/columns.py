"""The columns of the results frame (:func:`analysis.load.results_frame`): identity columns, short aliases,
the flattened config columns, how a value is shown, and how a key a user writes names a column (no torch
import). The error every analysis refusal raises lives here too."""

from __future__ import annotations

import difflib
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

#: the short column names and what they hold
ALIASES: dict[str, str] = {
    "loss": "the loss terms (see analysis.load's docstring)",
    "inheritance": "inheritance plug-in name (per stage joined by '→' when stages differ)",
    "student": "student model (last stage's for a staged run; '(pruned teacher)' when none is named)",
    "teacher": "teacher model (a local path shortened to its run folder name)",
    "stage": "stage name (metric stage/name; empty for a run without stages)",
    "target_sparsity": "cumulative target sparsity (metric sparsity/target, else the config's)",
    "seed": "config seed",
    "lr": "config train.lr",
    "batch_size": "config train.batch_size (global)",
    "world_size": "processes (metric dist/world_size, 1 if not recorded)",
    "steps": "training steps configured (summed over the stages of a staged run row)",
    "samples_seen": "steps x global batch size (summed over stages)",
    "train_time_s": "training time in seconds (metric train/duration_s; summed over the stage rows of a staged run)",
    "params": "params/vision + params/text (without the token embedding, TinyCLIP's count)",
}

IDENTITY_COLUMNS = ("run_id", "name", "status", "failed", "error", "row", "path")


class AnalysisError(ValueError):
    """A user error in the analysis (unknown key, no rows, bad file): one line."""


def config_columns(frame: pd.DataFrame) -> list[str]:
    """The flattened config columns of a results frame (``train.lr``, ``losses.0.name``): not an identity
    column, an alias or a metric (metric names hold a ``/``)."""
    return [c for c in frame.columns if "/" not in str(c) and c not in IDENTITY_COLUMNS and c not in ALIASES]


def value_text(value: Any) -> str:
    """A config value as text: numbers in ``%g`` form (``0.001``, ``50``), nothing for None/NaN."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "" if isinstance(value, float) and math.isnan(value) else f"{value:g}"
    return "" if value is None else str(value)


def resolve_key(frame: pd.DataFrame, key: str) -> str:
    """The column a key names (``config.`` / ``metrics.`` prefixes allowed), or an error with close matches."""
    for candidate in (key, key.removeprefix("config."), key.removeprefix("metrics.")):
        if candidate in frame.columns:
            return candidate
    close = difflib.get_close_matches(key, [str(c) for c in frame.columns], n=5, cutoff=0.5)
    hint = f"; close matches: {', '.join(close)}" if close else f"; aliases: {', '.join(ALIASES)}"
    raise AnalysisError(f"unknown key or metric {key!r}{hint}")


def read_json_lines(path: Path, what: str = "an object") -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` of each non-blank line of a JSON-lines file; a line that is not a JSON object is
    an :class:`AnalysisError` naming the file, the line and ``what`` the line should be."""
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise AnalysisError(f"{path}:{number}: not JSON ({error})") from None
        if not isinstance(row, dict):
            raise AnalysisError(f"{path}:{number}: a JSON {type(row).__name__}, not {what}")
        out.append((number, row))
    return out
