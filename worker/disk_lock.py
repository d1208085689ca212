"""An exclusive lock on a disk tier's directory, held for the worker's life.

Two workers on one directory would each trust their own index and remove the
other's files as leftovers, so the second one is refused at start-up instead.
`fcntl.flock` is released by the kernel when the process dies, even by kill -9:
a crashed worker never leaves a stale lock behind. The file holds the owner's
pid, only so the refusal can name it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = "lock"


class CacheDirLocked(RuntimeError):
    """Another process holds the disk tier's directory."""


class DirectoryLock:
    def __init__(self, directory: Path):
        self.path = directory / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise CacheDirLocked (at once: a start-up must not wait on another worker)."""
        if self.path.is_symlink():
            self.path.unlink()  # our name in our directory: the link goes, never what it points to
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            os.close(fd)
            raise CacheDirLocked(
                f"the disk cache {self.path.parent} is in use by another worker{owner}; "
                "give each worker serving this model its own --cache-dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def _read_owner(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return ""
    return f" (pid {text})" if text.isdigit() else ""
