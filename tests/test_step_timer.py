"""Per-step timing: the phases of a step in the logged record, and no device sync on a step that is not logged."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from compress.step_timer import PHASES, StepTimer, is_timing_key
from tests.test_train import make_batch, make_trainer, models  # noqa: F401  (the fixture)


class FakeEvent:
    """A CUDA timing event on a fake stream: completes when the test says, counts host syncs."""

    clock = 0.0
    done_upto = 0.0
    syncs = 0

    def record(self) -> None:
        FakeEvent.clock += 1.0  # each record is 1 ms after the previous one on the stream
        self.at = FakeEvent.clock

    def query(self) -> bool:
        return self.at <= FakeEvent.done_upto

    def synchronize(self) -> None:
        FakeEvent.syncs += 1
        FakeEvent.done_upto = max(FakeEvent.done_upto, self.at)

    def elapsed_time(self, end: FakeEvent) -> float:
        assert self.query() and end.query(), "elapsed_time of an event not completed (torch raises)"
        return end.at - self.at


def test_device_phases_are_read_without_a_sync_until_the_log_step():
    FakeEvent.clock = FakeEvent.done_upto = 0.0
    FakeEvent.syncs = 0
    made = []
    timer = StepTimer(torch.device("cpu"), event=lambda: made.append(FakeEvent()) or made[-1])
    for step in range(3):
        with timer.device("teacher"):  # records at 1, 2 (then 3, 4 and 5, 6)
            pass
        with timer.device("student"):
            pass
        timer.end_step()
        if step == 0:
            FakeEvent.done_upto = 4.0  # the device finished the first step while the host queued the second
    assert FakeEvent.syncs == 0  # three steps, no host sync
    assert len(timer._queued) == 2  # step 0 was read at step 1's end (query: done), steps 1 and 2 wait
    assert len(made) == 8  # step 0's events were reused by step 2
    record = timer.read(samples_per_s=64.0, world_size=4)
    assert FakeEvent.syncs == 1  # the log step waits for its last event, once
    # each segment took 1 ms on the stream; means per step over the window's 3 steps
    assert record["time/teacher_s"] == pytest.approx(1e-3) and record["time/student_s"] == pytest.approx(1e-3)
    assert record["time/samples_per_s_per_device"] == 16.0
    assert {f"time/{p}_s" for p in PHASES} | {"time/step_s"} <= record.keys()
    assert timer.read(1.0, 1)["time/teacher_s"] == 0.0  # a new window


def test_the_logged_record_holds_where_each_step_spent_its_time(models):  # noqa: F811
    teacher, student = models
    records = []
    batches = itertools.repeat(make_batch(8))  # micro-batches of 16 / 2
    trainer = make_trainer(teacher, copy.deepcopy(student), steps=4, accum=2, log_every=2, on_log=records.append,
                           batches=batches)
    trainer.fit()
    assert [r["step"] for r in records] == [1, 2, 4]
    for record in records:
        phases = [record[f"time/{p}_s"] for p in PHASES]
        assert all(t > 0 for t in phases), record  # data, teacher, student, loss, optimizer: each ran
        assert sum(phases) <= record["time/step_s"] * 1.05
        assert record["time/samples_per_s_per_device"] == record["samples_per_s"]  # one process
    assert all(is_timing_key(k) for k in records[0] if k.startswith("time/"))
