"""Live tracking: the records a run logs to ``metrics.jsonl`` also go to TensorBoard and Weights & Biases.

``train.report_to`` lists the trackers (``jsonl``, ``tensorboard``, ``wandb``); ``metrics.jsonl`` is always
written (the Trainer writes it; resume cuts it back to the checkpoint). Every tracker is fed the very record that
goes to ``metrics.jsonl`` (:meth:`compress.train.Trainer._log` hands it to ``on_log``), on rank 0 only, with the
record's ``step`` as the tracker's step, and is given the run id as its run id. A resumed run continues the same
curves: the TensorBoard writer purges what an earlier attempt logged after the checkpoint (``purge_step``, the
mechanism TensorBoard's reader applies), the W&B run is resumed by id. A run started from step 0 in a folder with
earlier event files (no checkpoint to resume) removes them, as it removes ``metrics.jsonl``: one series per run;
its W&B files are kept (they may not be synced yet) and the attempt gets a W&B run of its own
(:mod:`compress.tracking.wandb_tracker`).

The packages are optional (``pip install "clip-compress[track]"``); a run that names a tracker whose package is
missing is refused in one line before anything is loaded (:func:`require_trackers`).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from compress.rundir import TENSORBOARD_DIR
from compress.tracking.base import EXTRA, Tracker, Trackers, numeric, require_trackers

__all__ = ["EXTRA", "Tracker", "Trackers", "numeric", "open_trackers", "require_trackers"]


def open_trackers(names: Sequence[str], directory: Path, *, run_dir: Path, run_id: str, name: str,
                  config: Mapping[str, Any], resumed_at: int | None, group: str) -> Trackers:
    """The stage's trackers: TensorBoard's in ``directory`` (the run's or the stage's folder), W&B's in
    ``run_dir/wandb`` (every stage's). ``run_id``: the tracker's run id (a stage's: the run id and the stage
    folder's name), ``group`` the run id. ``resumed_at``: the checkpoint's step when resuming (call before
    ``metrics.jsonl`` is cut back to it), ``None`` when starting at step 0."""
    if resumed_at is None:  # a fresh start: one series per run, as for metrics.jsonl (W&B's files are kept)
        shutil.rmtree(directory / TENSORBOARD_DIR, ignore_errors=True)
    trackers: list[Tracker] = []
    if "tensorboard" in names:
        from compress.tracking.tensorboard_tracker import TensorBoardTracker

        trackers.append(TensorBoardTracker(directory / TENSORBOARD_DIR, resumed_at))
    if "wandb" in names:
        from compress.tracking.wandb_tracker import WandbTracker

        trackers.append(WandbTracker(run_dir, base_id=run_id, name=name, config=config, group=group,
                                     resumed_at=resumed_at))
    return Trackers(trackers)
