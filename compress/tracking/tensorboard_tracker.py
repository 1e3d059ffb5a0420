"""TensorBoard: the logged records as scalars in event files (``RUN_DIR/tensorboard``), read by ``tensorboard
--logdir runs/`` (each run directory, and each stage folder of a staged run, is one TensorBoard run).

Each number of a record is one scalar at the record's step, stored in double precision (``new_style`` tensor
summaries with ``DT_DOUBLE``), so what TensorBoard reads back equals ``metrics.jsonl`` exactly. Every writer starts
with a session-start event at its ``purge_step``: step 0 for a fresh start, the checkpoint's step + 1 for a resumed
run, so TensorBoard's reader drops what an earlier attempt logged after the checkpoint (the first start event of a
run is not a restart; every later one purges the steps from its own on).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from compress.tracking.base import EXTRA, numeric

#: seconds between the writer's flushes to disk (also flushed at every close)
FLUSH_SECS = 30


class TensorBoardTracker:
    """Writes the records to event files in ``log_dir``; ``resumed_at``: the checkpoint's step, or ``None``."""

    def __init__(self, log_dir: Path, resumed_at: int | None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:  # torch's writer imports the tensorboard package
            raise ImportError(f"train.report_to: tensorboard needs the tensorboard package: {EXTRA}") from error
        purge_step = 0 if resumed_at is None else resumed_at + 1  # the records of steps after the checkpoint
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step, flush_secs=FLUSH_SECS)

    def log(self, record: Mapping[str, Any]) -> None:
        step = int(record["step"])
        for key, value in numeric(record).items():
            self.writer.add_scalar(key, value, step, new_style=True, double_precision=True)

    def summary(self, metrics: Mapping[str, Any]) -> None:
        """The result metrics are the row's (``result.json``); TensorBoard shows the curves only."""

    def close(self, ok: bool) -> None:
        self.writer.close()
