"""The `pasd` command line. `main` turns SIGINT and SIGTERM into an interrupt before anything
else is imported, so a signal at any point, even while the command line itself loads, exits 130
with one line and no traceback."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any


def main(argv: Sequence[str] | None = None) -> None:
    from ..errors import Interrupted
    from ..interrupts import install

    install()
    try:
        from .faults import reach

        reach("start")
        from .app import main as run

        run(argv)
    except Interrupted as exc:  # before the app's own handling exists, or around it
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)


def __getattr__(name: str) -> Any:
    if name == "app":
        from .app import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["app", "main"]
