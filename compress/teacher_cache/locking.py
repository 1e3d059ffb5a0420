"""One writer per shard: an exclusive ``fcntl.flock`` on ``shard-XXXXXX.lock`` while the shard is generated.

The kernel releases the lock when its process dies, so a killed generator's shard is taken over by the next
one that asks. On a file system without ``flock`` (some NFS or Lustre mounts) a warning is printed once and
generation goes on unlocked: a shard's content is a function of its index, and its folder is renamed into
place atomically, so two writers of one shard cost time, never correctness.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
from pathlib import Path

#: errors of ``flock`` on a file system that does not support it
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_warned = False


def _warn_unsupported(path: Path, error: OSError) -> None:
    global _warned
    if not _warned:
        _warned = True
        print(f"clip-compress: warning: no file locks on {path.parent} ({error.strerror or error}); the teacher "
              "cache is generated without them (generators of one shard may both compute it; the result is the "
              "same)", file=sys.stderr)


class ShardLock:
    """``with ShardLock(path, blocking) as held:`` ``held`` is False when another process holds it (non-blocking).

    On leaving, the lock is released; :meth:`remove` (called by the holder after its shard is in place) unlinks the
    lock file: any later holder of the old or a new lock file finds the shard done and skips it."""

    def __init__(self, path: str | Path, blocking: bool) -> None:
        self.path, self.blocking = Path(path), blocking
        self.fd: int | None = None

    def __enter__(self) -> bool:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        flags = fcntl.LOCK_EX | (0 if self.blocking else fcntl.LOCK_NB)
        try:
            fcntl.flock(self.fd, flags)
        except BlockingIOError:
            self._close()
            return False
        except OSError as error:
            if error.errno not in _UNSUPPORTED:
                self._close()
                raise
            _warn_unsupported(self.path, error)
        return True

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def _close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the flock
            self.fd = None

    def __exit__(self, *exc: object) -> None:
        self._close()
