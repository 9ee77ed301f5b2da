"""A hook for fault-injection tests (tests/test_fault_injection.py), read by the command line only.

`PASD_FAULT="POINT:N:SIGNAL[:DELAY]"` sends this process SIGNAL (INT, TERM or KILL) the N-th time
it reaches POINT: at once, or DELAY seconds later from a timer thread, so that it lands inside what
follows (an import, a weights read). Points:

    start   the command line begins, before it imports anything of its own
    load    a model begins to load: the imports of torch and diffusers, then the weights
    step    a denoising step is reported (any progress stage of the engine counts by its name)
    write   an output is being written: 0, its temporary file is open and empty; 1, its bytes
            are in it, not yet flushed and renamed into place

Unset, every call is one dictionary lookup."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

ENV = "PASD_FAULT"

_seen: dict[str, int] = {}


def reach(point: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    where, count, name, *delay = spec.split(":")
    if where != point:
        return
    _seen[point] = _seen.get(point, 0) + 1
    if _seen[point] != int(count):
        return
    sig = signal.Signals[f"SIG{name}"]
    seconds = float(delay[0]) if delay else 0.0
    if seconds:
        timer = threading.Timer(seconds, os.kill, (os.getpid(), sig))
        timer.daemon = True
        timer.start()
    else:
        os.kill(os.getpid(), sig)


def watch(progress: Callable[[str, int, int], Any]) -> Callable[[str, int, int], Any]:
    """`progress`, reaching a point for each stage it reports (see the module's doc)."""
    if not os.environ.get(ENV):
        return progress

    def reported(stage: str, done: int, total: int) -> Any:
        reach(stage)
        return progress(stage, done, total)

    return reported
