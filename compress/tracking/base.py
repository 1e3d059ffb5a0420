"""What every tracker shares: the protocol, the set of one stage's trackers, the package check, the numbers of a
record (see :mod:`compress.tracking`)."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from compress.config import ConfigError

logger = logging.getLogger(__name__)

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
        """Close every tracker (one failing to close does not keep the others open; its error is raised after)."""
        trackers, self.trackers = self.trackers, []
        errors = []
        for tracker in trackers:
            try:
                tracker.close(ok)
            except Exception as error:  # noqa: BLE001  (raised below, once the others are closed)
                errors.append(error)
        if errors:
            raise errors[0]

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        if kind is None:
            self.close(ok=True)
            return
        try:  # the stage's own error (or stop) is what the run reports, not a tracker's failure to close
            self.close(ok=False)
        except Exception as error:  # noqa: BLE001
            logger.warning("a tracker could not be closed after the stage stopped: %s", error)
