"""Failure memory: inputs that failed for what they contain are skipped by the next run while
they are unchanged. Several workers (shards) share one output folder, so a run saves its own
changes into what is on disk at that moment, under a lock: none of them loses another's."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..atomic import write_atomic
from ..errors import DeviceError, OutputError

FAILURES_FILE = ".pasd-failures.json"
LOCK_WAIT = 60.0  # seconds; saving takes milliseconds, so a longer wait means a stuck file system


class FailureLog:
    """Inputs found in folders or globs that failed for what they contain, kept beside the outputs
    (`-o DIR/.pasd-failures.json`), so a re-run over the folder skips them while they are unchanged
    (same size and modification time) instead of failing on them again: a cron job reports a bad
    file once. Inputs named on the command line or on stdin are always tried; so are all of them
    with `--retry-failed` or `--on-exists overwrite`."""

    def __init__(self, out_dir: Path, writable: bool = True):
        self.path = Path(out_dir) / FAILURES_FILE
        self.writable = writable  # a dry run reads it and writes nothing
        self.entries = self._read()
        self.changed = False
        self._added: dict[str, dict[str, Any]] = {}
        self._removed: set[str] = set()

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            entries = json.loads(self.path.read_text()).get("failures", {})
        except (OSError, ValueError, AttributeError):
            return {}
        return entries if isinstance(entries, dict) else {}

    @staticmethod
    def _key(source: Path) -> str:
        return os.path.realpath(source)

    @staticmethod
    def _identity(source: Path) -> dict[str, int] | None:
        try:
            stat = source.stat()
        except OSError:
            return None
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    def known(self, source: Path) -> str | None:
        entry = self.entries.get(self._key(source))
        identity = self._identity(source)
        if entry and identity and all(entry.get(k) == v for k, v in identity.items()):
            reason = entry.get("reason")
            return reason if isinstance(reason, str) else None
        return None

    def record(self, source: Path, reason: str) -> None:
        identity = self._identity(source)
        if identity is not None:
            key = self._key(source)
            self.entries[key] = self._added[key] = {**identity, "reason": reason}
            self._removed.discard(key)
            self.changed = True

    def forget_where(self, stale: Callable[[str], bool]) -> None:
        """Forget every failure whose reason is `stale`: those inputs are tried again."""
        for key, entry in list(self.entries.items()):
            if stale(str(entry.get("reason", ""))):
                self._drop(key)

    def forget(self, source: Path) -> None:
        key = self._key(source)
        if key in self.entries:
            self._drop(key)

    def _drop(self, key: str) -> None:
        del self.entries[key]
        self._added.pop(key, None)
        self._removed.add(key)
        self.changed = True

    def save(self) -> None:
        """This run's changes, into the file as other workers may have left it meanwhile."""
        if not (self.changed and self.writable):
            return
        from filelock import FileLock, Timeout

        try:
            with FileLock(f"{self.path}.lock", timeout=LOCK_WAIT):
                entries = {k: v for k, v in self._read().items() if k not in self._removed}
                entries.update(self._added)
                data = json.dumps({"version": 1, "failures": entries}, indent=1, sort_keys=True).encode()
                write_atomic(self.path, lambda handle: handle.write(data))
        except Timeout:
            raise DeviceError(f"{self.path}: still locked by another run after {LOCK_WAIT:g}s") from None
        except OSError as exc:  # the lock file cannot be made (write_atomic's own errors are ours)
            raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        self.entries = entries
        self._added.clear()
        self._removed.clear()
        self.changed = False
