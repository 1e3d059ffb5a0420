"""The one atomic writer: write to a temporary file in the target's folder, fsync it, rename it, fsync the folder.

A reader never sees half a file, and a crash mid-write leaves the previous file in place. The file's data
is on disk before the rename (``fsync``), and the rename is on disk before the function returns (``fsync``
of the folder): after a node crash the name holds the old content or the new, never a torn or empty file
(ext4/xfs with delayed allocation may otherwise persist the rename before the data).
The temporary file is created private (``mkstemp``: mode 0600) and given the mode an
ordinary ``open()`` would have (0666 less the umask) before the rename, so result files
and exported models stay readable to colleagues in a shared folder. No torch import:
``analysis`` uses it too.

:func:`write_failure` is the one place that tells whether a failed write is the file system's fault (a full disk,
a quota, a read-only or failing disk) and says so in a few words: checkpoints, the run directory and the run's
own failure message all ask it. :func:`check_output` refuses, reading only and before any compute, an output
path that cannot be written (a folder where a file goes, a file where a folder goes, a read-only folder).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

#: the reason :func:`write_failure` gives for a full disk
NO_SPACE = "no space left on device"
#: what torch (``RuntimeError``) and safetensors (``SafetensorError``) say when a write fails for a full disk:
#: they do not raise ``OSError``
DISK_FULL_TEXT = (NO_SPACE, "os error 28", "storagefull", "file write failed")
#: below this many free bytes, a write that failed without saying why is taken for a full disk
NEARLY_FULL_BYTES = 16 * 2**20


def _default_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` fills a temporary path next to ``path``; it then replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, _default_file_mode())
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a folder's entries (names created, renamed or removed in it), to disk. A file's
    error (EIO, ENOSPC of delayed allocation) is raised; a folder that cannot be synced (Windows, a file
    system answering EINVAL) is skipped."""
    folder = Path(path).is_dir()
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if folder:  # pragma: no cover - platforms without directory fds
            return
        raise
    try:
        os.fsync(fd)
    except OSError as error:
        if not folder or error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see the module docstring)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_failure(error: BaseException, root: str | Path | None = None) -> str | None:
    """Why a write failed if the file system is to blame, in a few words (``None``: another error).

    The first ``OSError`` with an errno in the error's chain (``__cause__``/``__context__``) decides:
    ENOSPC gives :data:`NO_SPACE`, any other errno the system's words for it ("disk quota exceeded", "permission
    denied", "read-only file system", "not a directory"). torch and safetensors report a full disk as a
    ``RuntimeError``/``SafetensorError``: their text decides then and, given ``root`` (the folder that was
    written to), the free space left there (below :data:`NEARLY_FULL_BYTES`: a full disk)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            if seen.errno == errno.ENOSPC:
                return NO_SPACE
            return (seen.strerror or os.strerror(seen.errno)).lower()
        seen = seen.__cause__ or seen.__context__
    if any(text in str(error).lower() for text in DISK_FULL_TEXT):
        return NO_SPACE
    if root is not None:
        try:
            if shutil.disk_usage(root).free < NEARLY_FULL_BYTES:
                return NO_SPACE
        except OSError:  # pragma: no cover - the folder is gone
            pass
    return None


class OutputPathError(ValueError):
    """An output path this process cannot write (printed by the command line as one line, exit 2)."""


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # pragma: no cover - no statvfs
        return False


def output_problem(path: str | Path, folder: bool = False) -> str | None:
    """Why ``path`` could not be written as a file (or made as a ``folder``), reading only; ``None`` when it looks
    writable. The path must not be a folder (a file) or a file (a folder), and the nearest folder of it that exists
    must be a folder and writable. What only writing shows (a full disk) is for :func:`write_failure`."""
    path = Path(path)
    if path.is_dir() != folder and path.exists():
        return f"{path} is a folder, not a file" if path.is_dir() else f"{path} is a file, not a folder"
    start = path if folder else path.parent
    existing = next((p for p in (start, *start.parents) if p.exists()), None)
    if existing is None:  # pragma: no cover - the root (or the working folder) always exists
        return None
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is {'on a read-only file system' if _read_only(existing) else 'not writable by this user'}"
    return None


def check_output(path: str | Path, option: str, folder: bool = False) -> None:
    """Refuse (:class:`OutputPathError`, naming ``option``) an output file (or ``folder``) that
    :func:`output_problem` says cannot be written: asked before any compute, so a mistake costs no run."""
    problem = output_problem(path, folder)
    if problem is not None:
        raise OutputPathError(f"{option}: cannot write {path}: {problem}")
