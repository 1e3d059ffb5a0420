"""Where a training step's time goes: waiting for data, the teacher, the student, the loss, the optimizer.

The logged record of a log step holds, for the steps since the previous log step, the mean seconds per step of
each phase (``time/<phase>_s``), the wall time per step (``time/step_s``) and the samples per second of one
device (``time/samples_per_s_per_device``: the run's samples per second over the world size).

- ``data_wait`` is host time: the trainer blocked in the data stream's ``next`` (both streams of the gradient
  cache), timed with ``time.perf_counter``.
- ``teacher``, ``student`` (the towers' forward and backward passes, the features pass and the live passes),
  ``loss`` (the loss terms, the regulariser and their backward) and ``optimizer`` (clipping, the finite check,
  the update) are device time. On the CPU the device is the host: ``perf_counter``. On CUDA each timed segment
  is a pair of timing events on the current stream (``torch.cuda.Event(enable_timing=True)``), so the time is
  the stream's, not the host's (kernels run asynchronously); there is **no host sync per step**: after every
  step the pairs of earlier steps whose last event has completed are read (``Event.query()`` never blocks), and
  only a log step waits for its own last event (``Event.synchronize()``; a log step reads the loss on the host
  anyway). Events are reused, so a run creates about two per timed segment of one step.

Cost: two event records per segment (a few microseconds of host time each, off the device's critical path while
the host runs ahead of it); with ``accum_steps`` micro-batches a step has about ``3 x accum_steps + 2`` segments
(teacher and features pass per micro-batch, a live pass per micro-batch, the loss, the optimizer).
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import torch

#: the phases of a step, in the record as ``time/<phase>_s``
PHASES = ("data_wait", "teacher", "student", "loss", "optimizer")
#: every timing key of a logged record starts with this (curves compared across runs leave them out)
TIME_PREFIX = "time/"


def is_timing_key(key: str) -> bool:
    """Whether a key of a logged record measures the machine (time, speed) rather than the training."""
    return key.startswith(TIME_PREFIX) or key == "samples_per_s"


class TimingEvent(Protocol):
    """What the timer needs of ``torch.cuda.Event(enable_timing=True)``."""

    def record(self) -> None: ...
    def query(self) -> bool: ...
    def synchronize(self) -> None: ...
    def elapsed_time(self, end: Any) -> float: ...


class StepTimer:
    """Accumulates each phase's time over the steps of a log window; see the module docstring."""

    def __init__(self, device: torch.device, event: Callable[[], TimingEvent] | None = None) -> None:
        self.on_device = device.type == "cuda" or event is not None
        self._new_event = event or (lambda: torch.cuda.Event(enable_timing=True))
        self._free: list[TimingEvent] = []
        self._step: list[tuple[str, TimingEvent, TimingEvent]] = []  # this step's event pairs
        self._queued: deque[list[tuple[str, TimingEvent, TimingEvent]]] = deque()  # earlier steps', not read yet
        self._reset()

    def _reset(self) -> None:
        self._seconds = dict.fromkeys(PHASES, 0.0)
        self._steps = 0
        self._window_start = time.perf_counter()

    @contextlib.contextmanager
    def host(self, phase: str) -> Iterator[None]:
        """Time a phase spent on the host (``data_wait``)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[phase] += time.perf_counter() - start

    @contextlib.contextmanager
    def device(self, phase: str) -> Iterator[None]:
        """Time a phase of device work: a pair of events on CUDA, ``perf_counter`` elsewhere."""
        if not self.on_device:
            with self.host(phase):
                yield
            return
        start = self._event()
        start.record()
        try:
            yield
        finally:
            end = self._event()
            end.record()
            self._step.append((phase, start, end))

    def _event(self) -> TimingEvent:
        return self._free.pop() if self._free else self._new_event()

    def end_step(self) -> None:
        """A step is over: its pairs wait to be read; those of finished earlier steps are read (no wait)."""
        self._steps += 1
        if self._step:
            self._queued.append(self._step)
            self._step = []
        self._read_events(wait=False)

    def _read_events(self, wait: bool) -> None:
        if wait and self._queued:  # the newest event: every earlier one on the stream is done with it
            self._queued[-1][-1][2].synchronize()
        while self._queued:
            pairs = self._queued[0]
            if not pairs[-1][2].query():  # a step's last event on the stream: its pairs are done when it is
                return
            for phase, start, end in pairs:
                self._seconds[phase] += start.elapsed_time(end) / 1000.0
                self._free += [start, end]
            self._queued.popleft()

    def read(self, samples_per_s: float, world_size: int) -> dict[str, float]:
        """The window's means per step (waits for the window's last event on CUDA), and starts a new window."""
        self._read_events(wait=True)
        steps = max(self._steps, 1)
        out = {f"{TIME_PREFIX}{phase}_s": seconds / steps for phase, seconds in self._seconds.items()}
        out[f"{TIME_PREFIX}step_s"] = (time.perf_counter() - self._window_start) / steps
        out[f"{TIME_PREFIX}samples_per_s_per_device"] = samples_per_s / max(world_size, 1)
        self._reset()
        return out

    def replay(self, replay: Any) -> Any:
        """The gradient cache's second data stream with its draws counted as ``data_wait`` (``None`` stays)."""
        return None if replay is None else _TimedReplay(replay, self)


class _TimedReplay:
    """A :class:`compress.step_inputs.Replay` whose draws are timed as ``data_wait``."""

    def __init__(self, replay: Any, timer: StepTimer) -> None:
        self._replay, self._timer = replay, timer

    def begin_step(self) -> None:
        self._replay.begin_step()

    def again(self, first: Mapping[str, Any]) -> Mapping[str, Any]:
        with self._timer.host("data_wait"):
            return self._replay.again(first)
