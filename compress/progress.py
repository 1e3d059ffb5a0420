"""Progress reporting that suits where stderr goes.

On a terminal: a tqdm bar (redrawn at most every ``mininterval`` seconds). Anywhere else (a
pipe, a SLURM log, a CI log): plain lines, one every ``every`` updates or ``interval_s``
seconds at most, plus the last one, so a log file grows by a few lines, never by one line
per step.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm import tqdm


def is_terminal(stream: TextIO | None = None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class LineProgress:
    """The plain-lines counterpart of a tqdm bar: ``update``, ``set_postfix``, ``close``."""

    def __init__(
        self, total: int | None, desc: str, stream: TextIO | None = None, lines: int = 20, interval_s: float = 60.0
    ) -> None:
        self.total, self.desc = total, desc
        self.stream = sys.stderr if stream is None else stream
        self.every = max((total or 0) // max(lines, 1), 1) if total else None
        self.interval_s = interval_s
        self.n = 0
        self.postfix: dict[str, Any] = {}
        self.started = self.last_time = time.monotonic()
        self.last_n = 0
        self.closed = False

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        due_count = self.every is not None and self.n - self.last_n >= self.every
        due_time = now - self.last_time >= self.interval_s
        if due_count or due_time or (self.total is not None and self.n >= self.total):
            self._write(now)

    def _write(self, now: float) -> None:
        if self.n == self.last_n and self.last_n:
            return
        of = f"/{self.total}" if self.total else ""
        extra = "".join(f" {k}={v}" for k, v in self.postfix.items())
        print(f"[{self.desc}] {self.n}{of} ({now - self.started:.0f} s){extra}", file=self.stream, flush=True)
        self.last_n, self.last_time = self.n, now

    def close(self) -> None:
        if not self.closed and self.n != self.last_n:
            self._write(time.monotonic())
        self.closed = True


def progress(total: int | None, desc: str, enabled: bool = True, stream: TextIO | None = None) -> Any:
    """A tqdm bar on a terminal, :class:`LineProgress` elsewhere, or a silent tqdm when disabled."""
    if not enabled:
        return tqdm(total=total, disable=True)
    if is_terminal(stream):
        return tqdm(total=total, desc=desc, dynamic_ncols=True, mininterval=0.5, file=stream)
    return LineProgress(total, desc, stream)


def progress_iter(items: Iterable[Any], desc: str, enabled: bool = True, total: int | None = None) -> Iterator[Any]:
    """Iterate ``items`` with :func:`progress` reporting (evaluation loops)."""
    if total is None:
        total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    bar = progress(total, desc, enabled)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()
