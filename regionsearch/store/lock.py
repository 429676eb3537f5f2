"""The writer lock of an index directory: one writing process per index.

A POSIX advisory ``flock`` on ``<directory>/.lock``, holding the writer's pid for the error
message. The OS drops it when the process dies, so a crash never leaves a stale lock. On
platforms without ``fcntl`` the lock is skipped.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .errors import IndexLockedError

try:  # POSIX advisory locks
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"


def acquire_writer_lock(directory: Path) -> int | None:
    """The locked file descriptor, or :class:`IndexLockedError` naming the holder."""
    if fcntl is None:  # pragma: no cover
        return None
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = ""
        with contextlib.suppress(OSError, ValueError):
            holder = os.read(fd, 32).decode().strip()
        os.close(fd)
        by = f" (process {holder})" if holder.isdigit() else ""
        raise IndexLockedError(
            f"index {directory.name!r} is being written by another process{by}, e.g. "
            "`regionsearch index` or an upload to `regionsearch serve`; run this again when "
            "it has finished (searching, `stats` and `serve` work meanwhile)"
        ) from exc
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def release_writer_lock(fd: int | None) -> None:
    """Unlock and close (idempotent for ``None``)."""
    if fd is None:
        return
    with contextlib.suppress(OSError):
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
