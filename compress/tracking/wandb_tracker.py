"""Weights & Biases: the logged records as the history of a W&B run whose id is the run id.

Offline by default (no network: the run is written to ``RUN_DIR/wandb/offline-run-*`` and uploaded later with
``wandb sync RUN_DIR/wandb/offline-run-*``); ``WANDB_MODE`` (``online``, ``offline``, ``disabled``) is respected,
and so are ``WANDB_PROJECT`` (default ``clip-compress``) and ``WANDB_ENTITY``. The run is opened with
``resume="allow"`` under the run id (a stage's: the run id and the stage's folder name, grouped by the run id), so
every attempt of a run writes to the same W&B run. W&B's history takes each step once and in order: the steps an
earlier attempt already sent (logged after its checkpoint, and logged again by the resumed attempt with the same
values, resume being exact) are not sent again; the last step sent is kept in ``wandb/clip_compress_last_step``.
The stage's result metrics go to the run's summary.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from compress.rundir import WANDB_DIR
from compress.tracking.base import EXTRA, numeric

#: the W&B project when ``WANDB_PROJECT`` names none
DEFAULT_PROJECT = "clip-compress"
#: the last step sent to the W&B run of this folder (steps up to it are not sent again)
LAST_STEP_FILE = "clip_compress_last_step"


class WandbTracker:
    """One W&B run in ``directory/wandb``; see the module docstring."""

    def __init__(self, directory: Path, *, run_id: str, name: str, config: Mapping[str, Any],
                 group: str | None = None) -> None:
        try:
            import wandb
        except ImportError as error:
            raise ImportError(f"train.report_to: wandb needs the wandb package: {EXTRA}") from error
        (directory / WANDB_DIR).mkdir(parents=True, exist_ok=True)
        self.last_step_file = directory / WANDB_DIR / LAST_STEP_FILE
        self.sent = int(self.last_step_file.read_text()) if self.last_step_file.is_file() else 0
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT), id=run_id, name=name, group=group,
            dir=str(directory), resume="allow", mode=None if os.environ.get("WANDB_MODE") else "offline",
            config=dict(config), settings=wandb.Settings(console="off", silent=True),
        )

    def log(self, record: Mapping[str, Any]) -> None:
        step = int(record["step"])
        if step <= self.sent:  # the W&B run holds it from an earlier attempt
            return
        self.run.log(numeric(record), step=step)
        self.sent = step
        # renamed into place, not fsynced (rank 0 must not wait on the disk at every log step): a kill may lose
        # the last few, which W&B then gets again (its history keeps the first of a step, the same values)
        tmp = self.last_step_file.with_suffix(".tmp")
        tmp.write_text(str(step))
        tmp.replace(self.last_step_file)

    def summary(self, metrics: Mapping[str, Any]) -> None:
        self.run.summary.update({k: v for k, v in metrics.items() if isinstance(v, int | float | str | bool)})

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)
