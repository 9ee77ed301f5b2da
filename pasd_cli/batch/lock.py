"""`--lock FILE`: one run at a time for cron jobs, with `filelock`'s flock lock.

A lock file is an empty regular file that the lock made (flock keeps nothing in it). A path that
holds anything else is refused before the lock is taken, so a mistyped `--lock` never writes
into a user's file and never follows a symbolic link to one; that holds for a dry run too.
`hold_lock` takes the path alone, so a caller may derive one lock per share of a batch."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import DeviceError, UsageError

LOCK_HINT = "name a lock file of its own, e.g. --lock /tmp/pasd.lock; pasd makes it"


@contextmanager
def hold_lock(path: str | os.PathLike[str] | None) -> Iterator[None]:
    """Refuse to start while another run holds `path`. The OS drops the lock when the holder
    exits, however it exits, so a crashed run never blocks the next one."""
    if not path:
        yield
        return
    from filelock import FileLock, Timeout

    check_lock_path(Path(path))
    lock = FileLock(os.fspath(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise DeviceError(
            f"another pasd run holds the lock {path}",
            hint="wait for it to finish; the lock is released when it exits",
        ) from None
    except OSError as exc:
        raise UsageError(f"--lock {path}: {exc.strerror or exc}", hint=LOCK_HINT) from None
    try:
        yield
    finally:
        lock.release()


def check_lock_path(path: Path) -> None:
    """`path` may be taken as a lock: absent (in an existing folder), or an empty regular file,
    which is what a lock leaves behind. Anything else is refused, whatever it is."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        if not path.parent.is_dir():
            raise UsageError(f"--lock {path}: {path.parent} is not a folder", hint=LOCK_HINT) from None
        return
    except OSError as exc:
        raise UsageError(f"--lock {path}: {exc.strerror or exc}", hint=LOCK_HINT) from None
    if stat.S_ISLNK(info.st_mode):
        raise UsageError(f"--lock {path}: is a symbolic link, which a lock never follows", hint=LOCK_HINT)
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"--lock {path}: not a regular file", hint=LOCK_HINT)
    if info.st_size:
        raise UsageError(
            f"--lock {path}: holds {info.st_size} bytes, so it is not a lock file (locks are empty); "
            "it is left untouched",
            hint=LOCK_HINT,
        )
