"""The interface of a dispatch backend: where a run executes, and what it needs to know about it.

A backend is a :class:`Backend` subclass registered by name (:func:`experiments.backends.register_backend`).
It declares its ``dispatch.*`` keys as a dataclass (``Settings``, with defaults; checked where the config is
validated, before anything runs), says whether :meth:`Backend.submit` returns only once its runs ran
(``waits``), whether the runs execute on this machine (``runs_here``: the device is then checked here), what it
refuses (:meth:`Backend.refuse`: one line naming the key, before anything is submitted), how a job that its
scheduler restarted is recognised (:meth:`Backend.restart_count`) and how a run's row comes back
(:meth:`Backend.result`). Nothing here imports submitit or torch: a backend imports them when it submits.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from compress.config import ConfigError, RunConfig
from compress.config.dispatch import COMMON_KEYS
from compress.config.parsing import coerce
from compress.recipe import run_id_of
from compress.results import STATUS_FAILED, read_result

#: the status of a row for a run handed to a scheduler whose result arrives later (``slurm``)
STATUS_SUBMITTED = "submitted"

#: ``notify(cfg, job_id)``: a run has its job id (before an in-process run starts)
Notify = Callable[[RunConfig, str], None]


class DispatchError(RuntimeError):
    """A run cannot be dispatched as asked (no cluster here, say)."""


@dataclass
class Submission:
    """A run handed to a backend: its job id, and its row once known (backends that wait)."""

    cfg: RunConfig
    backend: str
    job_id: str
    row: dict[str, Any] | None = None
    job: Any = None


@dataclass
class JobSettings:
    """The settings of a backend that starts jobs (``local``, ``slurm``): ``timeout_min`` per run; the
    warning signal (``SIGUSR2``) ``signal_delay_s`` before the limit, and a job that times out is requeued
    (resuming from its checkpoint) at most ``max_num_timeout`` times (preemptions do not count)."""

    timeout_min: int = 60 * 24
    signal_delay_s: int = 120
    max_num_timeout: int = 3

    def check(self) -> None:
        at_least(self, timeout_min=1, signal_delay_s=0, max_num_timeout=0)
        if self.signal_delay_s >= 60 * self.timeout_min:
            raise ConfigError(
                f"dispatch.signal_delay_s: {self.signal_delay_s} s is not shorter than the time limit "
                f"(timeout_min {self.timeout_min}): the job would be signalled before it starts"
            )


def at_least(settings: Any, **lows: int) -> None:
    """``dispatch.<key>: must be at least <low>`` for the first of ``settings``' keys below its bound."""
    for key, low in lows.items():
        value = getattr(settings, key)
        if value is not None and value < low:
            raise ConfigError(f"dispatch.{key}: must be at least {low}, got {value}")


def parse_settings(cls: type, dispatch: Mapping[str, Any]) -> Any:
    """The dataclass ``cls`` from the keys of ``dispatch`` it declares (types checked as the config's are)."""
    hints = _hints(cls)
    return cls(**{k: coerce(v, hints[k], f"dispatch.{k}") for k, v in dispatch.items() if k in hints})


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """The settings dataclass's fields and their types (resolved once per class)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


class Backend(ABC):
    """Where runs execute. Subclasses set ``name``, ``waits`` and ``runs_here`` and implement :meth:`submit`."""

    #: the name ``dispatch.backend`` and ``--backend`` say
    name: ClassVar[str] = ""
    #: :meth:`submit` returns only after its runs ran, with their rows (in this process, one after the other)
    waits: ClassVar[bool] = False
    #: :meth:`result` gives the run's own row (waiting for its job); ``False``: a ``submitted`` row, the result
    #: lands in the run directory later
    returns_result: ClassVar[bool] = True
    #: ``clip-compress status`` and ``sweep`` can ask its scheduler whether a job is still queued
    #: (:meth:`queued_jobs`, called by :func:`experiments.status.mark_queued`)
    queue_visible: ClassVar[bool] = False
    #: the scheduler's name and how it is asked, for the note where it cannot be (``queue_visible`` backends)
    scheduler: ClassVar[str] = ""
    queue_query_hint: ClassVar[str] = ""
    #: the runs execute on this machine: the device and precision are checked here before they are submitted
    runs_here: ClassVar[bool] = True
    #: the run can also be started in a process of a ``torchrun`` (it starts no process or job of its own)
    under_torchrun: ClassVar[bool] = False
    #: its ``dispatch.*`` keys and their defaults (a dataclass; ``None``: none), checked by :meth:`check_settings`
    Settings: ClassVar[type | None] = None

    # -- the config -------------------------------------------------------------------------
    def settings(self, dispatch: Mapping[str, Any]) -> Any:
        """This backend's settings in a ``dispatch`` section (its ``Settings`` dataclass; ``None``: it has none)."""
        return parse_settings(self.Settings, dispatch) if self.Settings is not None else None

    def check_settings(self, settings: Any) -> None:
        """Refuse a bad value of a setting (:class:`ConfigError` naming ``dispatch.<key>``); the config's check,
        run for the chosen backend and for every backend one of whose settings is not at its default."""
        if hasattr(settings, "check"):
            settings.check()

    def queued_jobs(self, job_ids: Sequence[str]) -> dict[str, str] | None:
        """The jobs of ``job_ids`` still in the scheduler's queue, with their state, from one query for all of
        them; ``None`` where the scheduler cannot be asked. Only a ``queue_visible`` backend is asked."""
        raise NotImplementedError(f"backend {self.name!r} says queue_visible but has no queued_jobs")

    def group_key(self, cfg: RunConfig) -> str:
        """Configs with equal keys share a submission (an executor, an array): the common keys but the
        backend's name, and this backend's settings."""
        settings = self.settings(cfg.dispatch)
        common = {k: cfg.dispatch.get(k) for k in COMMON_KEYS if k != "backend"}
        return json.dumps([common, dataclasses.asdict(settings) if settings is not None else None],
                          sort_keys=True, default=str)

    # -- before anything runs -----------------------------------------------------------------
    def refuse(self, groups: Sequence[Sequence[RunConfig]]) -> None:
        """Raise :class:`DispatchError` (one line naming the key) for what this backend cannot run, before
        anything is submitted; ``groups``: the runs by equal settings (:meth:`group_key`). By default: nothing."""
        return None

    def check_device(self, cfg: RunConfig) -> None:
        """Refuse a ``train.device``/``train.precision`` the run would not have where it runs (one line)."""
        if self.runs_here:
            from compress.precision import run_device

            run_device(cfg)

    # -- running ------------------------------------------------------------------------------
    @abstractmethod
    def submit(self, groups: Sequence[Sequence[RunConfig]], folder: Path, force: bool,
               notify: Notify) -> list[Submission]:
        """Hand the runs to the backend (submitit's logs and pickles under ``folder``); ``notify`` as soon as
        a run has its job id."""

    def result(self, submission: Submission) -> dict[str, Any]:
        """The run's result row: the one :meth:`submit` returned, else the job's (waiting for it); a ``submitted``
        row where the result arrives later (``returns_result`` false)."""
        from compress.run import run_dir_for

        if submission.row is not None:
            return submission.row
        cfg = submission.cfg
        if not self.returns_result:
            return {"run_id": run_id_of(cfg), "name": cfg.name, "status": STATUS_SUBMITTED, "job_id": submission.job_id}
        try:
            result = submission.job.result()
        except Exception as error:  # noqa: BLE001 - the job's own result.json holds the failure
            return read_result(run_dir_for(cfg)) or {"run_id": run_id_of(cfg), "name": cfg.name,
                                                     "status": STATUS_FAILED, "error": str(error)}
        return result if isinstance(result, dict) else read_result(run_dir_for(cfg)) or {}

    def submit_tasks(self, name: str, calls: Sequence[Callable[[], Any]], cfg: RunConfig, folder: Path) -> list[Any]:
        """Run picklable callables that are not runs (say the parts of a teacher cache), each as one process
        with at most one GPU, with ``cfg``'s dispatch settings (submitit's logs under ``folder``, jobs named
        ``name``); returns one entry per call: its result where the backend waits, else its job id. By default
        each call runs in this process, one after the other."""
        return [call() for call in calls]

    @staticmethod
    def restart_count() -> int:
        """Inside a job: how often the scheduler restarted it (requeued after a preemption or a node failure);
        0 where nothing restarts jobs."""
        return 0

    def failure_hint(self, group: Sequence[RunConfig]) -> str:
        """What to add to the scheduler's own words when it refuses ``group``'s submission (empty: nothing)."""
        return ""


def submit_groups(backend: Backend, groups: Sequence[Sequence[RunConfig]], notify: Notify,
                  submit_one: Callable[[int, Sequence[RunConfig]], list[Submission]]) -> list[Submission]:
    """``submit_one(index, group)`` for each group; each group's runs are notified (in their order) as soon as
    it is submitted, so that what was submitted is recorded if a later group fails. A refusal (the scheduler's
    ``FailedJobError``, a process that did not start) is one line: :class:`DispatchError`."""
    order = {id(cfg): i for i, cfg in enumerate(cfg for group in groups for cfg in group)}
    out: list[Submission] = []
    for index, group in enumerate(groups):
        try:
            done = submit_one(index, group)
        except (OSError, RuntimeError) as error:
            message = " ".join(str(error).split()) + backend.failure_hint(group)
            raise DispatchError(f"{backend.name} submission failed: {message}") from None
        done.sort(key=lambda s: order[id(s.cfg)])
        for submission in done:
            notify(submission.cfg, submission.job_id)
        out += done
    return out


class CallQueue:
    """Several picklable calls one after the other in one job (a backend running at most ``max_parallel`` jobs);
    on preemption or timeout the calls not finished are requeued (each call's own ``checkpoint`` where it has
    one). Returns their results in order."""

    def __init__(self, calls: Sequence[Callable[[], Any]]) -> None:
        self.calls = list(calls)
        self.current = 0

    def __call__(self) -> list[Any]:
        results = []
        for index, call in enumerate(self.calls):
            self.current = index
            results.append(call())
        return results

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(CallQueue(self.calls[self.current:]))
