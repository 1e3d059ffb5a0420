"""A sweep's manifest, ``OUTPUT_DIR/manifest.jsonl``: one JSON line per submitted run (run id, name, run
directory, backend, job id, submit time, code version, axis values, config), appended by
``clip-compress sweep`` (:func:`experiments.sweep.manifest_line`) and read by ``status`` and by the next
submission; the newest line of a run id wins. No torch import."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MANIFEST_FILE = "manifest.jsonl"


def read_manifest(path: Path) -> dict[str, dict[str, Any]]:
    """The sweep manifest's entries by run id, the newest line of a run winning; a torn line is
    reported on stderr and skipped."""
    entries: dict[str, dict[str, Any]] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return entries
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            entries[str(entry["run_id"])] = entry
        except (ValueError, KeyError, TypeError) as error:
            print(f"clip-compress: warning: {path}:{number}: unreadable manifest line skipped ({error})",
                  file=sys.stderr)
    return entries


def entry_run_dir(entry: dict[str, Any], manifest: Path) -> Path:
    """The run directory a manifest entry names (a relative one: relative to the manifest's folder)."""
    path = Path(str(entry.get("run_dir", "")))
    if path.is_absolute() or path.exists():
        return path
    return manifest.parent / path


def values_text(values: Mapping[str, Any]) -> str:
    """A run's axis values (an entry's ``values``) in one line, each value as JSON:
    ``train.lr=0.0003, losses=[{"name": "clip"}]`` (what ``status``, the sweep's dry run and its errors print)."""
    return ", ".join(f"{key}={json.dumps(value, default=str)}" for key, value in values.items())
