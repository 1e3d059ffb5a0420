"""A third-party dispatch backend, in a file of its own, found through the entry-point group
``clip_compress.backends`` (``toy = tests.plugins.toy_backend:ToyBackend``): a fake scheduler that queues the
jobs :meth:`submit` hands it and returns at once; the test then plays the cluster and runs the queue. It has one
setting of its own (``dispatch.toy_queue``), refuses runs of several nodes, and recognises a restarted job by
``TOY_RESTARTS``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.config import ConfigError, RunConfig
from compress.recipe import run_id_of
from experiments.backends.base import Backend, DispatchError, Notify, Submission, submit_groups


@dataclass
class ToySettings:
    """``toy_queue``: the name of the fake scheduler's queue the jobs go to."""

    toy_queue: str = "default"

    def check(self) -> None:
        if not self.toy_queue.isidentifier():
            raise ConfigError(f"dispatch.toy_queue: {self.toy_queue!r} is not a queue name (letters, digits, _)")


class ToyBackend(Backend):
    """Queues picklable jobs; a test runs them as a scheduler would."""

    name = "toy"
    waits = False
    returns_result = False  # the row arrives when the test runs the queue
    Settings = ToySettings
    #: the jobs submitted and not run yet: (queue, job id, the picklable job)
    queue: list[tuple[str, str, Any]] = []

    def refuse(self, groups: Sequence[Sequence[RunConfig]]) -> None:
        for group in groups:
            if group[0].dispatch.nodes != 1:
                raise DispatchError(f"dispatch.nodes is {group[0].dispatch.nodes}: the toy scheduler has one node")

    def submit(self, groups: Sequence[Sequence[RunConfig]], folder: Path, force: bool,
               notify: Notify) -> list[Submission]:
        from experiments.job import RunJob

        def one(index: int, group: Sequence[RunConfig]) -> list[Submission]:
            out = []
            for cfg in group:
                job_id = f"toy-{len(ToyBackend.queue)}"
                queue = self.settings(cfg.dispatch).toy_queue
                ToyBackend.queue.append((queue, job_id, RunJob(cfg.to_dict(), force=force, run_id=run_id_of(cfg))))
                out.append(Submission(cfg, self.name, job_id))
            return out

        return submit_groups(self, groups, notify, one)

    @staticmethod
    def restart_count() -> int:
        return int(os.environ.get("TOY_RESTARTS") or 0)
