"""``clip-compress collect``: every ``result.json`` row under some folders into one JSON Lines file.

Run rows (``RUN_DIR/result.json``) and stage rows (``RUN_DIR/stages/K-NAME/result.json``), failed
and interrupted ones included (a table shows holes instead of silently missing cells), each with
``"row"`` (``run`` or ``stage``) and ``"path"`` (the folder it came from) added, sorted by path.
``analysis`` reads the file with pandas. No torch import.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from compress.fileio import atomic_write_text
from compress.results import RESULT_FILE
from compress.rundir import STAGES_DIR
from experiments.status import StatusError, find_run_dirs

ROW_RUN = "run"
ROW_STAGE = "stage"


def result_files(root: Path) -> list[Path]:
    """The run and stage ``result.json`` files of every run under ``root`` (or ``root`` itself, a file)."""
    root = Path(root)
    if root.is_file():
        if root.name != RESULT_FILE:
            raise StatusError(f"{root}: not a {RESULT_FILE} (give run folders, or their {RESULT_FILE} files)")
        return [root]
    files = []
    for run_dir in find_run_dirs(root):
        files += [p for p in [run_dir / RESULT_FILE] if p.is_file()]
        files += sorted((run_dir / STAGES_DIR).glob(f"*/{RESULT_FILE}"))
    return files


def row_kind(result_file: Path) -> str:
    """``stage`` for ``.../stages/K-NAME/result.json``, else ``run``."""
    return ROW_STAGE if result_file.parent.parent.name == STAGES_DIR else ROW_RUN


def collect_rows(paths: Sequence[Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows under ``paths`` (sorted by path, each file once) and one line per unreadable file.
    A path that does not exist or holds no ``result.json`` raises :class:`StatusError`."""
    files: dict[Path, Path] = {}
    for path in map(Path, paths):
        if not path.exists():
            raise StatusError(f"{path}: no such file or directory")
        found = result_files(path)
        if not found:
            raise StatusError(f"{path}: holds no {RESULT_FILE} (no run there has finished, failed or been interrupted)")
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


def collect(paths: Sequence[Path], out: Path) -> int:
    """Write every row under ``paths`` to ``out`` (JSON Lines, atomically) and return how many; the
    counts (per kind and per status) go to stdout, each unreadable ``result.json`` to stderr."""
    rows, unreadable = collect_rows(paths)
    for line in unreadable:
        print(f"clip-compress: warning: skipped unreadable {RESULT_FILE}: {line}", file=sys.stderr)
    if unreadable:
        print(f"clip-compress: warning: {len(unreadable)} unreadable {RESULT_FILE} skipped", file=sys.stderr)
    if not rows:
        raise StatusError(f"no readable {RESULT_FILE} under {', '.join(map(str, paths))}: nothing written")
    atomic_write_text(out, "".join(json.dumps(row) + "\n" for row in rows))
    kinds = Counter(row["row"] for row in rows)
    statuses = Counter(str(row.get("status")) for row in rows)
    print(f"wrote {len(rows)} rows to {out}: {kinds[ROW_RUN]} run, {kinds[ROW_STAGE]} stage rows; "
          + ", ".join(f"{n} {status}" for status, n in sorted(statuses.items())))
    return len(rows)
