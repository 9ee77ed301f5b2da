"""The `pasd` command line. `main` turns SIGINT and SIGTERM into an interrupt before anything
else is imported, so a signal at any point, even while the command line itself loads, exits 130
with one line and no traceback."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    from ..errors import Interrupted
    from ..interrupts import SIGNALS, install

    install()
    try:
        from .faults import reach

        reach("start")
        from .app import main as run

        run(argv)
    except Interrupted as exc:  # before the app's own handling exists, or around it
        import signal

        for sig in SIGNALS:  # leaving now: another Ctrl-C must not cut the message short
            signal.signal(sig, signal.SIG_IGN)
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)


__all__ = ["main"]
