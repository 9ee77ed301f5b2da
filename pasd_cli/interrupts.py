"""SIGINT and SIGTERM as an exception, `Interrupted`, raised wherever the program is when they
arrive: in an import, a weights read, a denoising step or a write. Only `deferred()` blocks hold
it back: clean-up that must finish once started (removing a temporary file, reporting the inputs
not done) runs to its end, and the interrupt is raised when the block is left.

The command line installs the handler first thing; a library caller that does not keeps Python's
own KeyboardInterrupt."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from .errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _State:
    depth = 0  # deferred() blocks entered
    pending: str | None = None  # the signal that arrived inside one


def install() -> None:
    """Turn SIGINT and SIGTERM into `Interrupted` (exit 130), also replacing KeyboardInterrupt."""
    for sig in SIGNALS:
        signal.signal(sig, _handle)


def _handle(signum: int, frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    if _State.depth:
        _State.pending = _State.pending or name
        return
    raise Interrupted(f"interrupted by {name}")


@contextmanager
def deferred() -> Iterator[None]:
    """Run the block to its end whatever signal arrives; an interrupt that came meanwhile is
    raised as the block is left. Signals are handled in the main thread only, so a block in
    another thread (a background write's clean-up) holds nothing back: it must not make the main
    thread's interrupt wait, nor take it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _State.depth += 1
    try:
        yield
    finally:
        _State.depth -= 1
        if not _State.depth and _State.pending:
            name, _State.pending = _State.pending, None
            raise Interrupted(f"interrupted by {name}")
