"""Failure memory: inputs that failed for what they contain are skipped by the next run while
they are unchanged."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..atomic import write_atomic

FAILURES_FILE = ".pasd-failures.json"


class FailureLog:
    """Inputs found in folders or globs that failed for what they contain, kept beside the outputs
    (`-o DIR/.pasd-failures.json`), so a re-run over the folder skips them while they are unchanged
    (same size and modification time) instead of failing on them again: a cron job reports a bad
    file once. Inputs named on the command line or on stdin are always tried; so are all of them
    with `--retry-failed` or `--on-exists overwrite`."""

    def __init__(self, out_dir: Path, writable: bool = True):
        self.path = Path(out_dir) / FAILURES_FILE
        self.writable = writable  # a dry run reads it and writes nothing
        self.entries: dict[str, dict[str, Any]] = {}
        self.changed = False
        try:
            self.entries = json.loads(self.path.read_text()).get("failures", {})
        except (OSError, ValueError, AttributeError):
            self.entries = {}

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
            self.entries[self._key(source)] = {**identity, "reason": reason}
            self.changed = True

    def forget_where(self, stale: Callable[[str], bool]) -> None:
        """Forget every failure whose reason is `stale`: those inputs are tried again."""
        for key, entry in list(self.entries.items()):
            if stale(str(entry.get("reason", ""))):
                del self.entries[key]
                self.changed = True

    def forget(self, source: Path) -> None:
        if self.entries.pop(self._key(source), None) is not None:
            self.changed = True

    def save(self) -> None:
        if not (self.changed and self.writable):
            return
        data = json.dumps({"version": 1, "failures": self.entries}, indent=1, sort_keys=True).encode()
        write_atomic(self.path, lambda handle: handle.write(data))
        self.changed = False
