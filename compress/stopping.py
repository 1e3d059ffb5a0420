"""Stopping a run on a signal: finish the step, checkpoint together, then stop.

A scheduler announces the end of a job: SLURM sends ``SIGUSR2`` ``dispatch.signal_delay_s`` before a
preemption or the time limit (submitit's ``--signal``), and ``SIGTERM`` when it stops the job (``scancel``,
the time limit itself, ``kill``). While a run trains, :func:`stop_signals` turns either signal into a stop
*request* that the handler only records; the trainer asks :func:`agreed` at the end of every step, all
ranks stop after the same step (a rank may see the signal a step after another: the request is combined
over ranks with one 4-byte all-reduce per step), every rank takes part in the checkpoint of that step, and
the trainer raises :class:`StoppedAtStep`. The run writes its ``interrupted`` row and the exception
propagates; under submitit the job then requeues (``experiments.job``). The resumed run loses at most
the step that was in progress when the signal came.

Outside training (loading models and data before it, export and evaluation after it) the signal acts at
once, as it did before: it raises :class:`StoppedAtStep` (step None) from wherever the run is. Nothing
trained is lost: the last training step always writes a checkpoint (``output.save_checkpoint``), so a
restart finds training finished and exports and evaluates again.

A second ``SIGTERM`` while a stop is pending raises :class:`RunInterrupted` at once; ``SIGINT`` (Ctrl-C)
is left to Python (``KeyboardInterrupt`` at once); a second ``SIGUSR2`` changes nothing. The command
line exits with ``128 + signal`` (143 for ``SIGTERM``, 140 for ``SIGUSR2``, 130 for Ctrl-C).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

#: the signals that request a stop at the end of the current step
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class RunInterrupted(BaseException):
    """A signal stopped the run (a scheduler stopping the job, ``kill``); ``signum`` is the signal."""

    def __init__(self, message: str, signum: int = signal.SIGTERM) -> None:
        super().__init__(message)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        """What a shell reports for a process ended by the signal: ``128 + signum``."""
        return 128 + self.signum


class StoppedAtStep(RunInterrupted):
    """Every rank stopped after optimizer step ``step`` (``None``: outside training) on ``signum``; the
    checkpoint of that step is written (if the run writes checkpoints)."""

    def __init__(self, signum: int, step: int | None) -> None:
        name = signal.Signals(signum).name
        where = f"after step {step} (checkpoint written)" if step is not None else "outside training"
        super().__init__(f"stopped by signal {name} {where}", signum)
        self.step = step


class _State:
    """The process's stop request (set by the handler, read at the end of every step)."""

    def __init__(self) -> None:
        self.requested = 0  # the signal number, 0: none
        self.deferring = False  # inside training: record, do not raise
        self.group: Any = None  # the CPU group the flag is reduced over (NCCL runs)
        self.group_of: Any = None


_STATE = _State()


def requested() -> int:
    """The stop signal this process received (0: none)."""
    return _STATE.requested


def _handler(signum: int, frame: Any) -> None:
    if _STATE.requested and signum == signal.SIGTERM:
        raise RunInterrupted(f"stopped by signal {signal.Signals(signum).name} (second signal while stopping)", signum)
    if _STATE.requested:  # a second USR2: the stop is already on its way
        return
    _STATE.requested = signum
    if not _STATE.deferring:
        raise StoppedAtStep(signum, None)
    log.warning("signal %s: stopping after the current step", signal.Signals(signum).name)


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """For the block, ``SIGUSR2`` and ``SIGTERM`` request a stop (see the module docstring); the previous
    handlers (submitit's, Python's defaults) are restored after. Main thread only: elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in STOP_SIGNALS}
    _STATE.requested, _STATE.deferring = 0, False
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _STATE.requested, _STATE.deferring = 0, False


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """While training: a stop signal is only recorded, the trainer stops at the end of the step. A request
    still pending when the block ends (the last step was in progress) stops the run at once after it."""
    _STATE.deferring = True
    try:
        yield
    finally:
        _STATE.deferring = False
    if _STATE.requested:
        raise StoppedAtStep(_STATE.requested, None)


def ignore_in_worker(worker_id: int) -> None:
    """``worker_init_fn`` of the data loaders: a worker ignores the stop signals. A scheduler signals every process
    of the job step (SLURM's ``--signal``, ``scancel``), loader workers included; a worker that died of it, or that
    raised in the handler it inherited by fork, would fail the step instead of letting the main process finish it
    and checkpoint. Workers still end with their main process (DataLoader's shutdown, or its watchdog)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def agreed() -> int:
    """The stop signal that any rank received (0: none), the same on every rank: one all-reduce (max) of one
    int32 per call, over gloo on the CPU (a side group when the run's backend is NCCL), so no device sync."""
    import torch
    import torch.distributed as dist

    from compress import distributed

    if not distributed.is_distributed():
        return _STATE.requested
    flag = torch.tensor([_STATE.requested], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_cpu_group())
    return int(flag.item())


def _cpu_group() -> Any:
    """``None`` (the default group) under gloo; under NCCL a gloo group of all ranks, made once per default group
    (every rank calls :func:`agreed` at the same step, so they create it together)."""
    import torch.distributed as dist

    from compress import distributed

    if dist.get_backend() == "gloo":
        return None
    default = dist.group.WORLD
    if _STATE.group_of is not default:
        _STATE.group = dist.new_group(backend="gloo", timeout=distributed.TIMEOUT)
        _STATE.group_of = default
    return _STATE.group
