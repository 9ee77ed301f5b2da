"""Helpers of the hardening tests: the real `pasd` command line, run in-process (no model loads
in these runs, so a subprocess would only add its start-up)."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import pytest

from pasd_cli.cli.app import main


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str

    def one_error(self) -> str:
        """The `error:` line, after checking it is the only one and no traceback came with it."""
        assert "Traceback" not in self.stderr, self.stderr
        errors = [line for line in self.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, self.stderr
        return errors[0]


def pasd_in_process(capsys: pytest.CaptureFixture[str], *args: object) -> Outcome:
    """`pasd ARGS` as `main` runs it; what it changes in the process (the environment, e.g.
    HF_HUB_OFFLINE for --offline, and the signal handlers) is put back afterwards."""
    capsys.readouterr()
    environ = dict(os.environ)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as exit_:
            main([str(a) for a in args])
    finally:
        os.environ.clear()
        os.environ.update(environ)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    out, err = capsys.readouterr()
    code = exit_.value.code
    return Outcome(code if isinstance(code, int) else 1, out, err)
