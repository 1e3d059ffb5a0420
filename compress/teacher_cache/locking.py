"""One writer per shard: an exclusive ``fcntl.flock`` on ``shard-XXXXXX.lock`` while the shard is generated.

The kernel releases the lock when its process dies, so a killed generator's shard is taken over by the next
one that asks. On a file system without ``flock`` (some NFS or Lustre mounts) a warning is printed once, the lock
is "held" unlocked (:attr:`ShardLock.supported` False) and the generator falls back to claim folders: a writer
creates its own temporary folder (``.shard-XXXXXX.tmp-HOST-PID-RANDOM``) before computing, another generator
skips a shard with a temporary folder younger than ``STALE_S`` (or, waiting, polls until it is committed or goes
stale), and only folders older than that are discarded (a killed writer's). What then holds: a live writer's
folder is never removed while it is younger than ``STALE_S`` (a shard written in under an hour), no committed
shard is ever changed (the rename of a second writer of one shard fails and its folder is removed: same content),
and two generators compute one shard only if both check it within the moment before either creates its folder,
or a writer's folder goes stale while it still computes; either costs time, never correctness.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
from pathlib import Path

#: seconds after its last change that a temporary shard folder counts as a killed writer's (without flock only)
STALE_S = 3600.0
#: errors of ``flock`` on a file system that does not support it
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_warned = False


def _warn_unsupported(path: Path, error: OSError) -> None:
    global _warned
    if not _warned:
        _warned = True
        print(f"clip-compress: warning: no file locks on {path.parent} ({error.strerror or error}); the teacher "
              "cache is generated without them (a shard another generator started under an hour ago is "
              "skipped or waited for; two generators may still compute one shard, with the same result)",
              file=sys.stderr)


class ShardLock:
    """``with ShardLock(path, blocking) as held:`` ``held`` is False when another process holds it (non-blocking).
    ``supported`` is False after entering on a file system without ``flock`` (``held`` is then True, unlocked).

    On leaving, the lock is released; :meth:`remove` (called by the holder after its shard is in place) unlinks the
    lock file: any later holder of the old or a new lock file finds the shard done and skips it."""

    def __init__(self, path: str | Path, blocking: bool) -> None:
        self.path, self.blocking = Path(path), blocking
        self.fd: int | None = None
        self.supported = True

    def __enter__(self) -> bool:
        self.supported = True
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
            self.supported = False
        return True

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def _close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the flock
            self.fd = None

    def __exit__(self, *exc: object) -> None:
        self._close()
