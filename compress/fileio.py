"""The one atomic writer: write to a temporary file in the target's folder, then rename.

A reader never sees half a file, and a crash mid-write leaves the previous file in place.
The temporary file is created private (``mkstemp``: mode 0600) and given the mode an
ordinary ``open()`` would have (0666 less the umask) before the rename, so result files
and exported models stay readable to colleagues in a shared folder. No torch import:
``analysis`` uses it too.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


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
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see the module docstring)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))
