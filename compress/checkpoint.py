"""Resume checkpoints: everything the next step depends on, and nothing that must be unpickled.

A checkpoint is a folder ``checkpoints/step-NNNNNNNN/`` holding

- ``student.safetensors``: the student's state dict (masks and multipliers included);
- ``student.json``: how to rebuild the student: its base open_clip config, its structure (per-layer
  heads, MLP widths and residual width, see :mod:`compress.models.structure`), its preprocess config,
  and the inheritance strategy's own record of what it made of it
  (:meth:`compress.plugins.Inheritance.record`, e.g. masks attached), which the strategy reads back
  on resume (:meth:`~compress.plugins.Inheritance.restore`);
- ``state.pt``: the trainer's state (optimizer, gradient scaler, schedules, counters, the
  strategy's own step) and, under ``ranks``, every process's data position and random states
  (one entry per rank of a data-parallel run), plain tensors and numbers read back with
  ``torch.load(weights_only=True)``;
- ``meta.json``: the run id and config hash it belongs to, its step and stage, its precision and
  the number of processes that wrote it.

The folder is written under a temporary name, every file and the folder are fsynced, and it is
renamed when complete (the rename fsynced too); only then does the pointer file
``checkpoints/latest`` (written atomically and fsynced) name it, and only after that are the older
checkpoints removed. A kill or a node crash at any moment leaves ``latest`` naming a complete
checkpoint on disk: a half-written folder is never read and is removed by the next write. A write
that fails (a full disk) removes its temporary folder at once, so the space is free for the run's
row, and raises :class:`CheckpointWriteError`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.fileio import NO_SPACE, atomic_write, atomic_write_text, fsync_path, write_failure
from compress.rundir import CHECKPOINT_DIR, CHECKPOINT_FORMAT, CHECKPOINT_META_FILE, LATEST_FILE

log = logging.getLogger(__name__)

FORMAT = CHECKPOINT_FORMAT
STUDENT_WEIGHTS = "student.safetensors"
STUDENT_RECORD = "student.json"
STATE_FILE = "state.pt"
META_FILE = CHECKPOINT_META_FILE
_PREFIX = "step-"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used for this run (another run's, another config's, unreadable)."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (a full disk, a quota, an I/O error); its partial folder is removed and
    the previous checkpoint is kept. ``errno`` is the underlying error's."""

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_


def config_hash(cfg: Any) -> str:
    """The hash a checkpoint records of the config it was written under: the whole resolved
    config that the run id is cut from (execution settings such as the device, logging or
    workers left out, so a run may resume on another machine)."""
    from compress.recipe import config_hash as resolved_hash

    return resolved_hash(cfg)


@dataclass
class Checkpoint:
    """A complete checkpoint folder and its ``meta.json``."""

    path: Path
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def student_record(self) -> dict[str, Any]:
        return json.loads((self.path / STUDENT_RECORD).read_text())

    def student_state(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.path / STUDENT_WEIGHTS), device="cpu")

    def state(self) -> dict[str, Any]:
        return torch.load(self.path / STATE_FILE, map_location="cpu", weights_only=True)

    def check_owner(self, run_id: str, config_sha: str) -> None:
        """Refuse a checkpoint written by another run or by another version of this run's config."""
        if self.meta.get("run_id") != run_id:
            raise CheckpointError(
                f"checkpoint {self.path} belongs to run {self.meta.get('run_id')}, not to this run ({run_id}); "
                "it is not resumed: remove it or start fresh with --force"
            )
        if self.meta.get("config_sha") != config_sha:
            raise CheckpointError(
                f"checkpoint {self.path} was written under another config (hash {self.meta.get('config_sha')}, "
                f"this config's is {config_sha}); it is not resumed: start fresh with --force"
            )


def latest_checkpoint(directory: str | Path) -> Checkpoint | None:
    """The checkpoint ``directory/checkpoints/latest`` names, or ``None`` if there is none."""
    root = Path(directory) / CHECKPOINT_DIR
    pointer = root / LATEST_FILE
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = root / name
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{pointer} names {name}, which is not a readable checkpoint ({error})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint")
    return Checkpoint(path, meta)


#: the keys of a student record that are the engine's (a strategy's record may not use them)
RECORD_KEYS = ("model_cfg", "structure", "preprocess_cfg", "converted")


def student_record(model: nn.Module, strategy: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """How to rebuild ``model``'s modules: base config, structure, preprocess config, and the strategy's own
    record (:meth:`compress.plugins.Inheritance.record`) beside them."""
    from compress.models.attention import is_converted
    from compress.models.export import preprocess_config
    from compress.models.structure import describe_structure

    cfg = getattr(model, "clip_cfg", None)
    if cfg is None:
        raise CheckpointError("the student has no clip_cfg: create it with compress.models.load_model")
    clash = sorted(set(strategy or {}) & set(RECORD_KEYS))
    if clash:
        raise CheckpointError(f"the inheritance strategy's record uses the engine's key(s) {clash}; rename them")
    converted = is_converted(model)
    return {
        "model_cfg": cfg,
        "structure": describe_structure(model) if converted else {},
        "preprocess_cfg": preprocess_config(model),
        "converted": converted,
        **(strategy or {}),
    }


def rebuild_student(record: Mapping[str, Any]) -> nn.Module:
    """A plain student of the recorded base config and structure (weights still to be loaded); what a strategy
    made of it beyond its structure is rebuilt by the strategy (:meth:`compress.plugins.Inheritance.restore`)."""
    from compress.models.factory import build_from_config, set_preprocess
    from compress.models.structure import apply_structure

    converted = bool(record.get("converted", True))
    model = build_from_config(record["model_cfg"], convert=converted)
    if record.get("structure"):
        apply_structure(model, record["structure"])  # new modules on the meta device: load with assign=True
        model.clip_structure = record["structure"]
    set_preprocess(model, record.get("preprocess_cfg"))
    return model


def write_checkpoint(
    directory: str | Path,
    step: int,
    student: nn.Module,
    state: Mapping[str, Any],
    meta: Mapping[str, Any],
    keep_every: int = 0,
    strategy_record: Mapping[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint of ``step`` under ``directory/checkpoints`` and point ``latest``
    at it; then remove the older ones, except those whose step is a multiple of ``keep_every``.
    ``strategy_record``: the inheritance strategy's record of the student, kept in ``student.json``."""
    from compress.models.export import save_safetensors

    root = Path(directory) / CHECKPOINT_DIR
    name = f"{_PREFIX}{step:08d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_safetensors(student.state_dict(), tmp / STUDENT_WEIGHTS)  # each file: atomic and fsynced
        atomic_write_text(tmp / STUDENT_RECORD, json.dumps(student_record(student, strategy_record), indent=1))
        atomic_write(tmp / STATE_FILE, lambda path: torch.save(dict(state), path))
        atomic_write_text(tmp / META_FILE, json.dumps({"format": FORMAT, **meta, "step": step}, indent=1))
        fsync_path(tmp)
    except Exception as error:  # the partial folder would keep the space the run's row needs
        reason = write_failure(error, root)  # None: not the disk's fault, raised as it is
        shutil.rmtree(tmp, ignore_errors=True)
        if reason is None:
            raise
        raise _write_error(reason, error, root, name) from error
    final = root / name
    if final.exists():  # a checkpoint of this step from before a crash (``latest`` names an older one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(root)  # the complete folder is on disk under its name ...
    atomic_write_text(root / LATEST_FILE, name + "\n")  # ... before ``latest`` names it (fsynced: file, then root)
    _prune(root, name, keep_every)  # ... and only then do the older ones go
    return final


def _write_error(reason: str, error: BaseException, root: Path, name: str) -> CheckpointWriteError:
    """One line: why the checkpoint could not be written, and which one the run keeps."""
    pointer = root / LATEST_FILE
    kept = pointer.read_text().strip() if pointer.is_file() else None
    keeps = f"the previous checkpoint {kept} is kept" if kept else "there is no earlier checkpoint"
    return CheckpointWriteError(
        f"{reason} while writing checkpoint {name} in {root} (the partial checkpoint was removed; {keeps})",
        getattr(error, "errno", None) or (errno.ENOSPC if reason == NO_SPACE else None),
    )


def remove_checkpoints(directory: str | Path) -> None:
    """Remove every checkpoint of a finished run or stage, and the ``latest`` pointer."""
    shutil.rmtree(Path(directory) / CHECKPOINT_DIR, ignore_errors=True)


def _prune(root: Path, current: str, keep_every: int) -> None:
    """Remove the checkpoints older than ``current`` (except multiples of ``keep_every``) and torn folders."""
    for path in root.iterdir():
        if path.name == current or path.name == LATEST_FILE:
            continue
        if path.name.startswith(_PREFIX) and path.is_dir():
            step = int(path.name[len(_PREFIX):])
            if keep_every and step % keep_every == 0:
                continue
        elif not path.name.startswith(".tmp-"):
            continue
        shutil.rmtree(path, ignore_errors=True)


# -- random states ---------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Python's, NumPy's, torch's CPU and every CUDA device's random state (loadable with weights_only)."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "torch": torch.get_rng_state(),
    }
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
