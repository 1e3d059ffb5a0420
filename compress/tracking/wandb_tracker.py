"""Weights & Biases: the logged records as the history of a W&B run, one W&B run per attempt started at step 0.

Offline by default (no network: the runs are written to ``RUN_DIR/wandb/offline-run-*``, a staged run's stages
too, and uploaded later with ``wandb sync RUN_DIR/wandb/offline-run-*``, which syncs the files of one W&B run in
the order they were started); ``WANDB_MODE`` (``online``, ``offline``, ``disabled``) is respected, and so are
``WANDB_PROJECT`` (default ``clip-compress``) and ``WANDB_ENTITY``. Nothing here deletes ``RUN_DIR/wandb``: it
may hold runs not synced yet.

W&B ids. W&B keeps a run's history in step order and ignores a step below the highest one it holds, so a run that
starts again at step 0 under an id W&B already knows would lose its new curve. Each attempt that starts at step 0
therefore gets its own id: the run id the first time (a stage's: the run id and the stage's folder name), then
``<id>-r2``, ``<id>-r3``, ...; the id in use is kept in ``RUN_DIR/wandb/clip_compress_ids.json`` and a resumed
attempt opens it again (``resume="allow"``). The W&B group is the run id, so the attempts and the stages of a run
sit together.

Resume. The resumed attempt sends every step after the checkpoint it resumes from. Steps the stopped attempt
had already sent past the checkpoint are sent again with the same values (resume is exact; the ``time/`` keys
differ) and W&B keeps the first it stored; those the stopped attempt logged but W&B never stored (a hard kill
before its service wrote them) are filled in. What stays missing in W&B: a step at or before the checkpoint
that was logged but not stored before a hard kill (``metrics.jsonl`` holds it). The stage's result metrics go
to the run's summary.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from compress.fileio import atomic_write_text
from compress.rundir import WANDB_DIR
from compress.tracking.base import EXTRA, numeric

#: the W&B project when ``WANDB_PROJECT`` names none
DEFAULT_PROJECT = "clip-compress"
#: the W&B id in use for each run (and stage) of this folder: ``{base id: {"id": ..., "attempt": n}}``
IDS_FILE = "clip_compress_ids.json"


def wandb_id(wandb_dir: Path, base_id: str, resumed: bool) -> str:
    """The W&B id of this attempt, recorded in ``wandb_dir/IDS_FILE``: the recorded one when resuming, else
    ``base_id`` the first time and ``base_id-r<n>`` at the n-th start from step 0 (see the module docstring)."""
    path = wandb_dir / IDS_FILE
    ids: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    known = ids.get(base_id)
    if resumed and known is not None:
        return str(known["id"])
    attempt = int(known["attempt"]) + 1 if known is not None else 1
    ids[base_id] = {"id": base_id if attempt == 1 else f"{base_id}-r{attempt}", "attempt": attempt}
    atomic_write_text(path, json.dumps(ids, indent=1, sort_keys=True) + "\n")
    return str(ids[base_id]["id"])


class WandbTracker:
    """One W&B run in ``root/wandb`` (``root``: the run's folder, also for a stage); see the module docstring.
    ``base_id``: the run id (a stage's: with its folder name); ``resumed_at``: the checkpoint's step, or ``None``
    for an attempt starting at step 0."""

    def __init__(self, root: Path, *, base_id: str, name: str, config: Mapping[str, Any], group: str,
                 resumed_at: int | None) -> None:
        try:
            import wandb
        except ImportError as error:
            raise ImportError(f"train.report_to: wandb needs the wandb package: {EXTRA}") from error
        (root / WANDB_DIR).mkdir(parents=True, exist_ok=True)
        self.sent = resumed_at or 0  # the trainer logs only steps after it; a guard, not a record of W&B's
        self.id = wandb_id(root / WANDB_DIR, base_id, resumed=resumed_at is not None)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT), id=self.id, name=name + self.id[len(base_id):],
            group=group,
            dir=str(root), resume="allow", mode=None if os.environ.get("WANDB_MODE") else "offline",
            config=dict(config), settings=wandb.Settings(console="off", silent=True),
        )

    def log(self, record: Mapping[str, Any]) -> None:
        step = int(record["step"])
        if step <= self.sent:
            return
        self.run.log(numeric(record), step=step)
        self.sent = step

    def summary(self, metrics: Mapping[str, Any]) -> None:
        self.run.summary.update({k: v for k, v in metrics.items() if isinstance(v, int | float | str | bool)})

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)
