"""Writing a file so that it is either complete or absent: a temporary file beside the target,
flushed, then renamed into place; and removing the temporary files that a writer killed outright
(kill -9, a power loss) left behind.

Each temporary file is locked (flock) from the moment it is made until it is renamed, so a file
named like ours that can be locked has no writer left: `remove_stale` removes only those, and
never one that another run, locked with --lock or not, is writing. The lock is taken while the
folder is held shared; `remove_stale` holds it exclusively, so no file is seen between its
making and its lock."""

from __future__ import annotations

import errno
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

from .errors import DeviceError, OutputError
from .interrupts import deferred

fcntl: ModuleType | None
try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

_FULL_DISK = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
# Our temporary names: ".<target name>.<mkstemp's 8 random characters>.part".
TEMPORARY_PREFIX, TEMPORARY_SUFFIX = ".", ".part"
_TEMPORARY = re.compile(re.escape(TEMPORARY_PREFIX) + r".+\.[a-z0-9_]{8}" + re.escape(TEMPORARY_SUFFIX))


def is_temporary(name: str) -> bool:
    """Whether `name` is one of our temporary file names."""
    return _TEMPORARY.fullmatch(name) is not None


def write_atomic(path: Path, write) -> None:
    """Call `write(file_object)` on a temporary file beside `path`, then rename it into place, so
    a crash or an interrupt never leaves a partial output. A full disk or quota becomes a
    `DeviceError` (exit 4); other write failures an `OutputError` for this one file."""
    path = Path(path)
    fd, tmp = -1, None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _folder_held(path.parent, exclusive=False):
            fd, tmp = tempfile.mkstemp(
                prefix=f"{TEMPORARY_PREFIX}{temporary_stem(path.name)}.", suffix=TEMPORARY_SUFFIX, dir=path.parent
            )
            _try_lock(fd)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; results get the usual permissions
        with os.fdopen(fd, "wb") as handle:
            fd = -1  # the handle closes it
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
            os.replace(tmp, path)  # still open, so still locked: never taken for a stale file
    except BaseException as exc:
        if fd >= 0:
            os.close(fd)
        if tmp is not None:
            _remove_quietly(Path(tmp))
        if isinstance(exc, OSError):
            raise _write_error(path, exc) from None
        raise


def remove_stale(folder: Path) -> list[Path]:
    """Remove the temporary files of ours in `folder` that no writer holds; returns them."""
    removed: list[Path] = []
    try:
        with _folder_held(Path(folder), exclusive=True), os.scandir(folder) as entries:
            for entry in entries:
                if is_temporary(entry.name) and entry.is_file(follow_symlinks=False) and _unheld(entry.path):
                    with deferred():
                        os.unlink(entry.path)
                    removed.append(Path(entry.path))
    except OSError:  # a folder that cannot be read or locked: its leftovers stay, as before
        pass
    return removed


def _unheld(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return False
    try:
        return _try_lock(fd)
    finally:
        os.close(fd)


@contextmanager
def _folder_held(folder: Path, exclusive: bool) -> Iterator[None]:
    """The folder's own lock: shared by writers while they make and lock a temporary file,
    exclusive for `remove_stale`. Where folders cannot be locked, writers go on without it and
    `remove_stale` removes nothing."""
    try:
        if fcntl is None:
            raise OSError(errno.ENOLCK, "no file locks here")
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        if exclusive:
            raise
        fd = -1
    if fd < 0 or fcntl is None:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        except OSError:
            if exclusive:
                raise
        yield
    finally:
        os.close(fd)  # releases the lock


def _try_lock(fd: int) -> bool:
    """Whether the exclusive lock on `fd` was taken (False: another holds it, or no file locks)."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_quietly(tmp: Path) -> None:
    # A second Ctrl-C must not interrupt the clean-up and leave the temporary file behind.
    with deferred():
        tmp.unlink(missing_ok=True)


def _write_error(path: Path, exc: OSError) -> Exception:
    if exc.errno in _FULL_DISK:
        return DeviceError(
            f"cannot write {path}: {exc.strerror or exc} (disk full or quota exceeded)",
            hint="free some space, or write to another disk",
        )
    return OutputError(f"cannot write {path}: {exc.strerror or exc}")


# What a temporary name adds to the target's: ".", then mkstemp's "." and 8 characters, ".part".
TEMPORARY_EXTRA_BYTES = 15
NAME_MAX = 255  # bytes in a file name on every common file system (ext4, APFS, NTFS in UTF-16 units)


def temporary_stem(name: str) -> str:
    """The target's name, cut so that its temporary name fits where the target's fits: a legal
    name of 241 to 255 bytes must not fail for its temporary file."""
    room = NAME_MAX - TEMPORARY_EXTRA_BYTES
    encoded = os.fsencode(name)
    if len(encoded) <= room:
        return name
    return os.fsdecode(encoded[:room].decode("utf-8", "ignore").encode("utf-8"))
