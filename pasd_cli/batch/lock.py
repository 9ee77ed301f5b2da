"""`--lock FILE`: one run at a time for cron jobs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import DeviceError, UsageError


@contextmanager
def hold_lock(path: str | None) -> Iterator[None]:
    """Refuse to start while another run holds `path`. The OS drops the lock when the holder
    exits, however it exits, so a crashed run never blocks the next one."""
    if not path:
        yield
        return
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise UsageError(f"--lock {path}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise DeviceError(
                f"another pasd run holds the lock {path} (pid {holder})",
                hint="wait for it to finish; the lock is released when it exits",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
