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

The all-reduce runs on the run's own process group. Under gloo (CPU) it is synchronous and read at once.
Under NCCL the flag is an int32 on the device, reduced asynchronously and copied without a host sync into
pinned memory; it is read at the end of the *next* step (the last step reads it at once), so a run stops at
most one step later than under gloo, that step checkpointed too. Every rank reads the value reduced at the
same step, so they all stop after the same step. No side group is made (a gloo group across nodes needs a
usable ``GLOO_SOCKET_IFNAME``).

When training ends normally the ranks agree once more (:func:`deferred`): a signal that reached only some
ranks after the last step's agreement stops all of them or none, never some ranks while the others wait in
the next collective.

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
from collections.abc import Callable, Iterator
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
        #: NCCL: the flag reduced at the previous call, on its way to the host: (device flag, host copy, wait)
        self.inflight: tuple[Any, Any, Callable[[], Any]] | None = None
        self.host: Any = None  # the pinned int32 the device flag is copied into (one per process)


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
    """While training: a stop signal is only recorded, the trainer stops at the end of the step. When the block
    ends normally the ranks agree once more (:func:`agreed`, the signal still only recorded meanwhile): a request
    that came after the last step's agreement, on any rank, stops every rank at once after it (all or none)."""
    _STATE.deferring, _STATE.inflight = True, None
    stop = 0
    try:
        yield
        stop = agreed(final=True)
    finally:
        _STATE.deferring, _STATE.inflight = False, None
    if stop:
        raise StoppedAtStep(stop, None)


def ignore_in_worker(worker_id: int) -> None:
    """``worker_init_fn`` of the data loaders: a worker ignores the stop signals. A scheduler signals every process
    of the job step (SLURM's ``--signal``, ``scancel``), loader workers included; a worker that died of it, or that
    raised in the handler it inherited by fork, would fail the step instead of letting the main process finish it
    and checkpoint. Workers still end with their main process (DataLoader's shutdown, or its watchdog)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def agreed(final: bool = False) -> int:
    """The stop signal that any rank received (0: none), the same on every rank: one all-reduce (max) of one int32
    per call on the run's process group. Under gloo it is read at once; under NCCL (a device flag, no host sync)
    a call returns what the previous call reduced and ``final`` (the last step) reads this call's value at once.
    Every rank must call it at the same points (the end of every step, then once when training ends)."""
    import torch
    import torch.distributed as dist

    from compress import distributed

    if not distributed.is_distributed():
        return _STATE.requested
    device = _flag_device()
    if device is None:  # gloo: the flag is on the CPU, the all-reduce costs no device sync
        flag = torch.tensor([_STATE.requested], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
    previous = _read_inflight()  # reduced at the previous call: the same value on every rank
    if previous:
        return previous  # every rank stops here, none launches another reduction
    flag = torch.full((1,), _STATE.requested, dtype=torch.int32, device=device)  # a fill kernel, no copy
    work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
    if device.type == "cuda":
        work.wait()  # NCCL: the current stream waits for the reduction; the host does not
        if _STATE.host is None:
            _STATE.host = torch.empty(1, dtype=torch.int32, pin_memory=True)
        _STATE.host.copy_(flag, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        _STATE.inflight = (flag, _STATE.host, done.synchronize)
    else:  # a CPU flag reduced asynchronously (how the tests run this path on gloo)
        _STATE.inflight = (flag, flag, work.wait)
    return _read_inflight() if final else 0


def _read_inflight() -> int:
    """The flag the previous call reduced (0: none in flight); waits for its copy to the host (by the next
    step's end the device has long finished the previous step, so the wait is short or none)."""
    if _STATE.inflight is None:
        return 0
    _, host, wait = _STATE.inflight
    _STATE.inflight = None
    wait()
    return int(host[0])


def _flag_device() -> Any:
    """Where the flag is reduced: ``None`` under gloo (on the CPU, synchronously); under NCCL the process's
    current CUDA device (the one :func:`compress.distributed.process_group` set), reduced asynchronously."""
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        return None
    return torch.device("cuda", torch.cuda.current_device())
