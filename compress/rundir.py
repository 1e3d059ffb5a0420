"""A run directory has one owner: one process at a time, and one config for its whole life.

- A second process that starts the same run while the first still trains is refused (an
  exclusive ``flock`` on ``RUN_DIR/.lock``, released by the kernel when the owner dies, so a
  killed run never leaves a stale lock).
- A run directory remembers the run id it was made for (``RUN_DIR/run_id``); a config with
  another id that points at it (a reused ``output.run_name``) is refused instead of
  overwriting another experiment's results.
- A run directory that cannot be made or written (``output.dir`` is a file, a read-only folder, a
  full disk) is refused in one line (:func:`check_writable`, :func:`unwritable`) before the run starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from compress.fileio import atomic_write_text, output_problem, write_failure

if TYPE_CHECKING:
    from compress.config import RunConfig

LOCK_FILE = ".lock"
RUN_ID_FILE = "run_id"
#: the resolved config of a run, and its (or a stage's) training log: one JSON line per logged step
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
#: the folder of a staged run that holds one folder per stage (``run_dir/stages/<k>-<name>``)
STAGES_DIR = "stages"
#: how long a starting run waits for a lock held only for a moment (``clip-compress status`` probing
#: it, :func:`lock_holder`) before it is refused; a real owner holds the lock for the whole run
LOCK_WAIT_S = 2.0

log = logging.getLogger(__name__)


def run_dir_for(cfg: RunConfig) -> Path:
    """``output.dir / (output.run_name or NAME-RUNID)``."""
    from compress.recipe import run_id_of

    return Path(cfg.output.dir) / (cfg.output.run_name or f"{cfg.name}-{run_id_of(cfg)}")


def stage_dir(run_dir: Path, stage_dir_name: str | None) -> Path:
    """Where a stage writes: ``run_dir/stages/<k>-<name>``; the run directory itself for a run without stages."""
    return run_dir if stage_dir_name is None else run_dir / STAGES_DIR / stage_dir_name


class RunDirError(RuntimeError):
    """The run directory belongs to another process or to another config."""


def recorded_run_id(run_dir: Path) -> str | None:
    """The run id a directory was made for (its ``run_id`` file, or an older run's ``result.json``)."""
    path = run_dir / RUN_ID_FILE
    if path.is_file():
        return path.read_text().strip() or None
    try:
        return json.loads((run_dir / "result.json").read_text()).get("run_id")
    except (OSError, ValueError):
        return None


def _holder(fd: int) -> str:
    """The pid the owner wrote into the lock file, or ``"unknown"``."""
    return os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"


def check_writable(run_dir: Path) -> None:
    """Refuse a run directory this process could not make or write, reading only (the dry run asks too): the
    nearest folder of ``run_dir`` that exists must be a folder (``output.dir``, or a folder above it, may be a
    file) and writable (:func:`compress.fileio.output_problem`). What only writing shows (a full disk; permissions
    the kernel checks otherwise, as for root) is said by :func:`unwritable` when the write fails."""
    problem = output_problem(run_dir, folder=True)
    if problem is not None:
        raise RunDirError(f"cannot make the run directory {run_dir}: {problem} (choose another output.dir)")


def unwritable(run_dir: Path, error: OSError) -> RunDirError:
    """The one line for a run directory whose making or first files failed (before the run has a row)."""
    where = f": {error.filename}" if getattr(error, "filename", None) else ""
    return RunDirError(f"cannot write the run directory {run_dir}: {write_failure(error) or error}{where}")


class RunDirBusy(RunDirError):
    """The run directory is held by another live process: the same run is running elsewhere (not a
    failure of this one)."""


def _busy(fd: int, run_dir: Path) -> RunDirBusy:
    return RunDirBusy(
        f"run directory {run_dir} is in use by another process (pid {_holder(fd)}): the same run is "
        "already running; wait for it or stop it"
    )


def _lock(fd: int) -> None:
    """Take the exclusive lock, retrying for :data:`LOCK_WAIT_S` (``BlockingIOError`` after that)."""
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


@contextlib.contextmanager
def owned_run_dir(run_dir: Path, run_id: str) -> Iterator[Path]:
    """Hold ``run_dir`` for the run ``run_id`` while the block executes (see the module docstring)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            _lock(fd)
        except BlockingIOError:
            raise _busy(fd, run_dir) from None
        except OSError as error:  # a file system without flock (some NFS setups)
            log.warning("cannot lock %s (%s): two processes could run the same run", run_dir, error)
        recorded = recorded_run_id(run_dir)
        if recorded is not None and recorded != run_id:
            raise RunDirError(
                f"run directory {run_dir} holds another config's run (run id {recorded}, this config's is "
                f"{run_id}): choose another output.run_name, or remove that folder"
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        atomic_write_text(run_dir / RUN_ID_FILE, run_id + "\n")
        yield run_dir
    finally:
        os.close(fd)  # releases the lock


def lock_holder(run_dir: Path) -> str | None:
    """The pid (as the owner wrote it, or ``"unknown"``) of the live process that holds ``run_dir``,
    or ``None`` when no process does: the lock is tried without waiting and released at once.
    A file system without ``flock`` answers ``None``."""
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY)
    except OSError:  # never locked (no lock file), or not readable
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(fd)
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
