"""What every tracker shares: the protocol, the set of one stage's trackers, the package check, the numbers of a
record (see :mod:`compress.tracking`)."""


from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from compress.config import ConfigError

#: the package each tracker needs (``jsonl`` needs none)
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
#: the extra that installs them
EXTRA = 'pip install "clip-compress[track]"'


class Tracker(Protocol):
    """A place the logged records go besides ``metrics.jsonl``."""

    def log(self, record: Mapping[str, Any]) -> None:
        """One logged record (its ``step`` key is the tracker's step)."""

    def summary(self, metrics: Mapping[str, Any]) -> None:
        """The stage's result metrics (its row), once, after evaluation."""

    def close(self, ok: bool) -> None:
        """Flush and close (``ok``: the stage completed; false: it failed or was stopped)."""


def require_trackers(names: Sequence[str]) -> None:
    """Refuse, in one line, trackers whose package is not installed (asked before a run loads anything)."""
    missing = [name for name in names if name in PACKAGES and importlib.util.find_spec(PACKAGES[name]) is None]
    if missing:
        packages = " and ".join(PACKAGES[name] for name in missing)
        raise ConfigError(f"train.report_to: {', '.join(missing)} needs the {packages} package: {EXTRA}")


def numeric(record: Mapping[str, Any]) -> dict[str, float]:
    """The record's numbers (``step`` left out: it is the step), as floats: what a tracker plots."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}


class Trackers:
    """The trackers of one stage, fed together; a context closes them (``ok`` unless an exception left it)."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def log(self, record: Mapping[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log(record)

    def summary(self, metrics: Mapping[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.summary(metrics)

    def close(self, ok: bool) -> None:
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close(ok)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        self.close(ok=kind is None)
