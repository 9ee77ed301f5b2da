"""Helpers of the hardening tests: the real `pasd` command line, run in-process (no model loads
in these runs, so a subprocess would only add its start-up)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from conftest import pasd_here


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
    """`pasd ARGS` as `main` runs it, in this process (conftest's `pasd_here`); whatever the test
    printed before is dropped from `capsys`."""
    capsys.readouterr()
    done = pasd_here(*args)
    return Outcome(done.returncode, done.stdout, done.stderr)
