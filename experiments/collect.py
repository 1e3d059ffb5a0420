"""``clip-compress collect``: every ``result.json`` row under some folders into one JSON Lines file.

Run rows (``RUN_DIR/result.json``) and stage rows (``RUN_DIR/stages/K-NAME/result.json``), failed
and interrupted ones included (a table shows holes instead of silently missing cells), each with
``"row"`` (``run`` or ``stage``) and ``"path"`` (the folder it came from) added, sorted by path.
``analysis`` reads the file with pandas. No torch import. The rows are read by
:func:`compress.results.collect_rows`, which ``analysis`` calls itself.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from compress.fileio import atomic_write_text
from compress.results import RESULT_FILE, ROW_RUN, ROW_STAGE, collect_rows, result_files, row_kind
from experiments.status import StatusError

#: reading the rows is :mod:`compress.results`' (``analysis`` reads them too, without ``experiments``)
__all__ = ["ROW_RUN", "ROW_STAGE", "collect", "collect_rows", "result_files", "row_kind"]


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
