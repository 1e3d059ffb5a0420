"""A run directory has one owner: one process at a time, and one config for its whole life.

- A second process that starts the same run while the first still trains is refused (an
  exclusive ``flock`` on ``RUN_DIR/.lock``, released by the kernel when the owner dies, so a
  killed run never leaves a stale lock).
- A run directory remembers the run id it was made for (``RUN_DIR/run_id``); a config with
  another id that points at it (a reused ``output.run_name``) is refused instead of
  overwriting another experiment's results.
- A run directory that cannot be made or written (``output.dir`` is a file, a read-only folder, a
  full disk) is refused in one line (:func:`check_writable`, :func:`unwritable`) before the run starts.

:class:`RunDir` owns the layout of a run directory (its name, and where its config, metrics, checkpoints,
stages, model, result and structure reports lie); every other module asks it instead of spelling file
names. This module imports no torch (sweeps, ``status``, ``collect`` and ``analysis`` use it)::

    output.dir/NAME-RUNID/          (a sweep's run: NAME-<axis values>-RUNID; output.run_name: that name)
        .lock  run_id  config.yaml  metrics.jsonl  result.json
        tensorboard/  wandb/              (train.report_to: the trackers' files; wandb/ holds every stage's
                                     W&B runs and is never removed, --force included)
        checkpoints/latest  checkpoints/step-NNNNNNNN/meta.json ...
        model/  structure.json  structure.md  structure.png  submitit/
        eval/<task list name>/      (``clip-compress eval RUN_DIR --tasks LIST``: the field's result files and
                                     summary.json, with the SHA-256 of the model evaluated: :func:`model_sha256`)
        stages/<k>-<name>/          (a staged run: one folder per stage, each with the layout of a run
                                     without stages: metrics, checkpoints, model, result, structure,
                                     tensorboard)
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
    pass

LOCK_FILE = ".lock"
RUN_ID_FILE = "run_id"
#: the resolved config of a run, and its (or a stage's) training log: one JSON line per logged step
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
#: the one result row of a run (and of each stage), see :mod:`compress.results`
RESULT_FILE = "result.json"
#: the folder of a staged run that holds one folder per stage (``run_dir/stages/<k>-<name>``)
STAGES_DIR = "stages"
#: the resume checkpoints (``checkpoints/step-NNNNNNNN/``) and the pointer file naming the newest complete one,
#: whose ``meta.json`` records its step (:mod:`compress.checkpoint` writes them)
CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest"
CHECKPOINT_META_FILE = "meta.json"
CHECKPOINT_FORMAT = "clip-compress-checkpoint/1"
#: the exported (physically smaller) student, loadable with ``compress.models.load_model``
MODEL_DIR = "model"
#: the exported student's per-layer structure (``compress.models.nonuniform.write_structure``), and the table and
#: heat-map ``analysis.structure_report`` draws from it
STRUCTURE_FILE = "structure.json"
#: the config of a non-uniform export (:mod:`compress.models.nonuniform`), beside its weights and structure
NONUNIFORM_CONFIG_FILE = "clip_compress_config.json"
REPORT_FILES = ("structure.md", "structure.png")
#: an inheritance's scores of its source (``importance/scores.safetensors``, its key in the file's metadata), kept
#: so that a restart or a re-prune (``scores_from``) skips the calibration pass
IMPORTANCE_DIR = "importance"
IMPORTANCE_SCORES_FILE = "scores.safetensors"
#: the logs submitit keeps of a run handed to a backend that does not run it in this process
SUBMITIT_DIR = "submitit"
#: the trackers' files (``train.report_to``, :mod:`compress.tracking`): TensorBoard's event files (in the run's or
#: the stage's folder), and the W&B runs of the run and all its stages (``RUN_DIR/wandb/offline-run-*``, synced
#: later with ``wandb sync``; never removed here: they may not be synced yet)
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
#: the folder of a run directory that task-list results go to (``RUN_DIR/eval/<task list name>/``)
RUN_EVAL_DIR = "eval"
#: what an attempt leaves in a run directory (removed by ``--force``; not :data:`WANDB_DIR`; task-list results of
#: its model, :data:`RUN_EVAL_DIR`, too)
RUN_OUTPUTS = (CHECKPOINT_DIR, STAGES_DIR, METRICS_FILE, RESULT_FILE, MODEL_DIR, STRUCTURE_FILE, *REPORT_FILES,
               TENSORBOARD_DIR, RUN_EVAL_DIR, IMPORTANCE_DIR)
#: the suffixes of model weight files (what :func:`model_sha256` hashes in a model folder)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
#: the status a finished run's ``result.json`` holds (:data:`compress.results.STATUS_COMPLETED`)
COMPLETED = "completed"
#: the files that make a folder a run directory
RUN_MARKERS = (RUN_ID_FILE, RESULT_FILE, CONFIG_FILE)
#: how long a starting run waits for a lock held only for a moment (``clip-compress status`` probing
#: it, :func:`lock_holder`) before it is refused; a real owner holds the lock for the whole run
LOCK_WAIT_S = 2.0

log = logging.getLogger(__name__)


def run_dir_name(name: str, run_id: str, label: str | None = None) -> str:
    """The name of a run's directory: ``NAME-RUNID``, or ``NAME-LABEL-RUNID`` (a sweep's run, labelled by its
    axis values); it ends in ``-RUNID``, so :func:`find_run_dir` finds a run by its id whatever the label."""
    return f"{name}-{label}-{run_id}" if label else f"{name}-{run_id}"


def find_run_dir(output_dir: Path, run_id: str) -> Path | None:
    """The one directory ``output_dir/*-RUNID`` if there is exactly one (a sweep edited without changing
    what a run computes keeps that run's directory), else ``None``."""
    output_dir = Path(output_dir)
    found = [p for p in output_dir.glob(f"*-{run_id}") if p.is_dir()] if output_dir.is_dir() else []
    return found[0] if len(found) == 1 else None


def stage_dir(run_dir: Path, stage_dir_name: str | None) -> Path:
    """Where a stage writes: ``run_dir/stages/<k>-<name>``; the run directory itself for a run without stages."""
    return run_dir if stage_dir_name is None else run_dir / STAGES_DIR / stage_dir_name


def stage_index(stage_dir_name: str) -> int | None:
    """``k`` of a stage folder ``<k>-<name>``, or ``None`` for a folder that is not a stage's."""
    head = stage_dir_name.split("-", 1)[0]
    return int(head) if head.isdigit() else None


class RunDir:
    """The layout of one run directory, or of one stage folder of a staged run (which has the same files,
    without the config, lock and stages): every path of a run is a property here, and nothing else spells
    a file name. A plain value (a path), cheap to make; it creates nothing."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def result(self) -> Path:
        return self.path / RESULT_FILE

    @property
    def run_id_file(self) -> Path:
        return self.path / RUN_ID_FILE

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINT_DIR

    @property
    def model(self) -> Path:
        return self.path / MODEL_DIR

    @property
    def structure(self) -> Path:
        return self.path / STRUCTURE_FILE

    @property
    def importance_scores(self) -> Path:
        return self.path / IMPORTANCE_DIR / IMPORTANCE_SCORES_FILE

    @property
    def reports(self) -> tuple[Path, ...]:
        return tuple(self.path / name for name in REPORT_FILES)

    @property
    def submitit(self) -> Path:
        return self.path / SUBMITIT_DIR

    @property
    def eval_dir(self) -> Path:
        return self.path / RUN_EVAL_DIR

    @property
    def stages_root(self) -> Path:
        return self.path / STAGES_DIR

    def stage(self, stage_dir_name: str | None) -> RunDir:
        """The folder of stage ``<k>-<name>`` (:func:`stage_dir`; this folder itself for ``None``)."""
        return RunDir(stage_dir(self.path, stage_dir_name))

    def stage_of(self) -> RunDir | None:
        """The run this folder is a stage of (``RUN/stages/<k>-<name>``), or ``None`` (not a stage folder)."""
        parent = self.path.parent
        return RunDir(parent.parent) if parent.name == STAGES_DIR else None

    def stages(self) -> list[RunDir]:
        """The stage folders ``stages/<k>-<name>`` there are, in stage order (none for a run without stages)."""
        if not self.stages_root.is_dir():
            return []
        found = [(stage_index(p.name), p) for p in self.stages_root.iterdir() if p.is_dir()]
        return [RunDir(p) for k, p in sorted((k, p) for k, p in found if k is not None)]

    def outputs(self) -> list[Path]:
        """What an attempt leaves here (:data:`RUN_OUTPUTS`), whether it exists or not."""
        return [self.path / name for name in RUN_OUTPUTS]

    def is_run(self) -> bool:
        """Whether the folder holds a run (one of :data:`RUN_MARKERS`)."""
        return is_run_dir(self.path)

    def recorded_run_id(self) -> str | None:
        return recorded_run_id(self.path)

    def lock_holder(self) -> str | None:
        return lock_holder(self.path)

    def checkpoint_step(self) -> int | None:
        """The step of the newest complete checkpoint (``checkpoints/latest`` names it; its ``meta.json`` holds
        the step), read without torch; ``None`` when there is none, or it cannot be read or is not of
        :data:`CHECKPOINT_FORMAT` (what ``compress.checkpoint.latest_checkpoint`` refuses)."""
        pointer = self.checkpoints / LATEST_FILE
        try:
            meta = json.loads((self.checkpoints / pointer.read_text().strip() / CHECKPOINT_META_FILE).read_text())
        except (OSError, ValueError):
            return None
        step = meta.get("step") if isinstance(meta, dict) and meta.get("format") == CHECKPOINT_FORMAT else None
        return step if isinstance(step, int) and not isinstance(step, bool) else None


class RunModelError(ValueError):
    """A run directory whose final model cannot be used (unfinished, or no exported model); one line."""


def final_model(run_dir: str | os.PathLike[str]) -> Path:
    """The final exported model of a finished run: ``model/``, or a staged run's last stage's
    (``stages/<k>-<name>/model``). The one place that finds it (``eval``, ``eval --tasks``, ``export``, the
    clip_benchmark loader): a run whose ``result.json`` is missing or not ``completed`` is refused (an unfinished
    run's folder may hold an earlier stage's model), and so is a completed run without its model."""
    layout = RunDir(run_dir)
    try:
        row = json.loads(layout.result.read_text()) if layout.result.is_file() else None
    except ValueError as error:
        raise RunModelError(f"{layout.path}: result.json is not valid JSON ({error})") from None
    status = row.get("status") if isinstance(row, dict) else None
    if status != COMPLETED:
        what = "no result.json" if row is None else f"status: {status}"
        raise RunModelError(f"{layout.path}: the run did not complete ({what}); it has no final model")
    final = (layout.stages() or [layout])[-1]
    if not final.model.is_dir():
        raise RunModelError(f"{layout.path}: the run has no exported model ({final.model.relative_to(layout.path)}/)")
    return final.model


def model_sha256(path: str | os.PathLike[str]) -> str | None:
    """SHA-256 of a model's weights: of the file itself, or, for a model folder, of each weight file
    (:data:`WEIGHT_SUFFIXES`) as lines ``<relative path> NUL <file SHA-256>`` (newline-ended) in sorted
    order; ``None`` for a model that is not a file or folder (an open_clip name) or a folder without weight
    files."""
    import hashlib

    path = Path(path)

    def digest(file: Path) -> str:
        h = hashlib.sha256()
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    if path.is_file():
        return digest(path)
    if not path.is_dir():
        return None
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        return None
    lines = "".join(f"{p.relative_to(path).as_posix()}\0{digest(p)}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds a run (its ``run_id``, ``result.json`` or ``config.yaml``)."""
    return any((Path(path) / marker).is_file() for marker in RUN_MARKERS)


def walk_run_dirs(root: Path, also: str | None = None) -> tuple[list[Path], list[Path]]:
    """The run directories under ``root`` (``root`` itself included; hidden folders skipped; the folders inside a
    run, its stages, checkpoints and model, are part of it, not runs of their own), sorted, and the files named
    ``also`` (a sweep's manifest) in the folders above them, sorted."""
    runs: list[Path] = []
    files: list[Path] = []
    for folder, subfolders, names in os.walk(root):
        path = Path(folder)
        if is_run_dir(path):
            runs.append(path)
            subfolders.clear()
            continue
        if also is not None and also in names:
            files.append(path / also)
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
    return sorted(runs), sorted(files)


def find_run_dirs(root: Path) -> list[Path]:
    """Every run directory under ``root`` (:func:`walk_run_dirs`)."""
    return walk_run_dirs(Path(root))[0]


class RunDirError(RuntimeError):
    """The run directory belongs to another process or to another config."""


def recorded_run_id(run_dir: Path) -> str | None:
    """The run id a directory was made for (its ``run_id`` file, or an older run's ``result.json``)."""
    path = run_dir / RUN_ID_FILE
    if path.is_file():
        return path.read_text().strip() or None
    try:
        return json.loads((run_dir / RESULT_FILE).read_text()).get("run_id")
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
