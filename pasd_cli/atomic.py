"""Writing a file so that it is either complete or absent: a temporary file beside the target,
flushed, then renamed into place."""

from __future__ import annotations

import errno
import os
import signal
import tempfile
from pathlib import Path

from .errors import DeviceError, OutputError

_FULL_DISK = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def write_atomic(path: Path, write) -> None:
    """Call `write(file_object)` on a temporary file beside `path`, then rename it into place, so
    a crash or an interrupt never leaves a partial output. A full disk or quota becomes a
    `DeviceError` (exit 4); other write failures an `OutputError` for this one file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{temporary_stem(path.name)}.", suffix=".part", dir=path.parent)
    except OSError as exc:
        raise _write_error(path, exc) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; results get the usual permissions
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        _remove_quietly(Path(tmp))
        if isinstance(exc, OSError):
            raise _write_error(path, exc) from None
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_quietly(tmp: Path) -> None:
    # A second Ctrl-C must not interrupt the clean-up and leave the temporary file behind.
    blockable = hasattr(signal, "pthread_sigmask")
    if blockable:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        tmp.unlink(missing_ok=True)
    finally:
        if blockable:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


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
