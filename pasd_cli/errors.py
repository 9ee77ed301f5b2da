"""Typed errors. Each carries the exit code the CLI maps it to and a hint for the user.

The engine raises these too (they hold no CLI logic), so a caller of the library gets the same
precise failures the command line reports. Where the way out is a setting, the error names it by
`field` (the library's name, e.g. "trust_pickle"): the command line adds its own option to the
hint, so the library's messages never name a flag.
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """A library exception's message cut to its first line (its type if it has none), for our
    one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class PasdError(Exception):
    """Base class: a failure we can explain in one line."""

    exit_code = 1
    hint: str | None = None
    field: str | None = None  # the setting or argument that the hint is about
    # A line said after the error and its hint: a batch's summary, which reads as the outcome
    # only once the reason for it has been given.
    epilogue: str | None = None

    def __init__(self, message: str, hint: str | None = None, *, field: str | None = None):
        super().__init__(message)
        if hint is not None:
            self.hint = hint
        if field is not None:
            self.field = field


class UsageError(PasdError):
    """Options that contradict each other or cannot be satisfied."""

    exit_code = 2


class InputError(PasdError):
    """One input image cannot be read or processed; the batch goes on."""

    exit_code = 1
    # Whether the failure comes from what the file contains, so that the batch remembers it and
    # skips the file while it is unchanged (batch/failures.py). An I/O error is not: a `chmod` or
    # a remount fixes it without touching the file.
    about_content = True


class ReadError(InputError):
    """One input cannot be read (permission denied, gone, an I/O error): nothing is known about
    its content, so it is tried again next time."""

    about_content = False


class ModelError(PasdError):
    """Weights missing, unreadable, of the wrong architecture, or failing verification."""

    exit_code = 3


class DeviceError(PasdError):
    """The device or the machine cannot do the work (missing backend, out of memory, disk full)."""

    exit_code = 4


class Interrupted(BaseException):
    """Stopped by SIGINT or SIGTERM (see `interrupts`). Like KeyboardInterrupt it is no Exception:
    it is raised wherever the program is when the signal comes, and a library's `except
    Exception` (a lazy import that wraps what fails in it, a weights reader that calls every
    failure a damaged file) must not turn it into another error. Callers catch it beside
    PasdError; it has the same fields."""

    exit_code = 130
    hint: str | None = None
    field: str | None = None


class OutputError(InputError):
    """One output cannot be written (permissions, a folder in its place); the batch goes on.
    Unlike other input errors it says nothing about the input, so it is not remembered."""

    about_content = False
