"""Writing a file so that it is either complete or absent: a temporary file beside the target,
flushed, then renamed into place. A writer killed outright (SIGKILL, a lost machine) leaves its
temporary file behind; the temporary file's name says which process wrote it, so the next run
that writes the same target removes it (`remove_stale_parts`)."""

from __future__ import annotations

import errno
import os
import signal
import socket
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from .errors import DeviceError, OutputError

_FULL_DISK = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
_PART = ".part"
# A temporary file lives for one encode and write (seconds): one this old whose writer cannot be
# checked (another machine, or written before names said who wrote them) is left over.
STALE_AFTER = 600.0


def write_atomic(path: Path, write) -> None:
    """Call `write(file_object)` on a temporary file beside `path`, then rename it into place, so
    a crash or an interrupt never leaves a partial output. A full disk or quota becomes a
    `DeviceError` (exit 4); other write failures an `OutputError` for this one file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_writer()}.", suffix=_PART, dir=path.parent)
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


def remove_stale_parts(targets: Iterable[Path]) -> list[Path]:
    """Remove the temporary files that dead writers left beside `targets` (one listing of each
    folder, whatever the number of targets); returns those removed. A writer is dead when it ran
    on this machine and its process is gone, or when its file is older than STALE_AFTER."""
    by_folder: dict[Path, set[str]] = {}
    for target in targets:
        by_folder.setdefault(Path(target).parent, set()).add(Path(target).name)
    removed = []
    for folder, names in by_folder.items():
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith(".") and entry.name.endswith(_PART) and _is_stale(entry, names):
                try:
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
                except OSError:  # gone already (another worker cleaned it), or not ours to remove
                    pass
    return removed


def _writer() -> str:
    """Who writes a temporary file: pid@host (no dots in the host, so names split back)."""
    return f"{os.getpid()}@{socket.gethostname().replace('.', '_')}"


def _is_stale(entry: os.DirEntry[str], targets: set[str]) -> bool:
    """`.{target}.{pid}@{host}.{random}.part`, or `.{target}.{random}.part` from older versions."""
    stem = entry.name[1 : -len(_PART)]
    base, at, writer = stem.rpartition("@")
    if at:
        target, _, pid = base.rpartition(".")
        host = writer.rpartition(".")[0]
        if target not in targets:
            return False
        if host == socket.gethostname().replace(".", "_") and pid.isdigit() and not _alive(int(pid)):
            return True
    elif stem.rpartition(".")[0] not in targets:
        return False
    try:
        return time.time() - entry.stat().st_mtime > STALE_AFTER
    except OSError:
        return False


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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
