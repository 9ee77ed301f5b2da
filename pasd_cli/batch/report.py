"""What a batch tells the user. Results go to stdout (output paths, or one JSON object per line
with --json); everything else to stderr: a Rich progress display when stderr is a terminal,
plain lines otherwise (logs, cron mail). `-q` keeps only errors; `-v` adds per-step lines."""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, TextIO

from .plan import CANCELLED, COLLISION, DONE, FAILED, INTERRUPTED, PLANNED, SKIPPED, Job
from .records import JobRecord, Summary
from .staleness import SKIPPED_OTHER_SETTINGS

if TYPE_CHECKING:  # Rich loads only when progress bars are drawn
    from rich.progress import TaskID

QUIET, NORMAL, VERBOSE = 0, 1, 2
# Without -v, plain progress repeats at most this often during one image (seconds).
PLAIN_PROGRESS_EVERY = 10.0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def _sizes(record: JobRecord) -> str:
    """ " (2048x1536, working 2048x1536)": a plan's output and working sizes, where known."""
    working = record.extra.get("working_size")
    parts = [f"{record.output_size[0]}x{record.output_size[1]}"] if record.output_size else []
    parts += [f"working {working[0]}x{working[1]}"] if working else []
    return f" ({', '.join(parts)})" if parts else ""


class Reporter:
    def __init__(
        self,
        verbosity: int = NORMAL,
        json_lines: bool = False,
        paths_to_stdout: bool = True,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
        live: bool | None = None,
    ):
        self.verbosity = verbosity
        self.json_lines = json_lines
        self.paths_to_stdout = paths_to_stdout and not json_lines
        self._stdout = stdout  # None: sys.stdout at each write (Rich redirects it around its bars on a tty)
        self.stderr = stderr or sys.stderr
        if live is None:
            live = verbosity > QUIET and self.stderr.isatty()
        self._live = _LiveProgress(self.stderr) if live else None
        self._job_started = 0.0
        self._last_line = 0.0
        self._image_seconds: list[float] = []
        self.hold_summary = False
        self.held_summary: str | None = None

    @property
    def stdout(self) -> TextIO:
        return self._stdout or sys.stdout

    # -- plain messages on stderr
    def _line(self, text: str) -> None:
        if self._live:
            self._live.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            print(text, file=self.stderr, flush=True)

    def info(self, text: str) -> None:
        if self.verbosity >= NORMAL:
            self._line(text)

    def debug(self, text: str) -> None:
        if self.verbosity >= VERBOSE:
            self._line(text.rstrip())

    def warn(self, text: str) -> None:
        if self.verbosity >= NORMAL:
            self._line(f"warning: {text}")

    # -- results
    def _result(self, line: str) -> None:
        """One line on stdout in one write: print() writes the text and the newline apart, and
        with unbuffered output (PYTHONUNBUFFERED) workers sharing a pipe under torchrun could
        join two records on one line. A single write below the pipe's atomic size cannot."""
        self.stdout.write(line + "\n")
        self.stdout.flush()

    def record(self, record: JobRecord) -> None:
        if self.json_lines:
            self._result(json.dumps(record.to_json(), ensure_ascii=False, default=str))
        status = record.status
        if status in (FAILED, COLLISION):
            self._line(f"error: {record.input}: {record.reason}")  # errors show even with -q
        elif status == INTERRUPTED:
            self.info(f"stopped {record.input}: nothing written")
        elif status == DONE:
            if self.paths_to_stdout:
                self._result(str(record.output))
            note = f" ({record.extra['notes']})" if record.extra.get("notes") else ""
            self.debug(f"done {record.input} -> {record.output} in {record.seconds:.1f}s{note}")
        elif status == SKIPPED:  # a re-run over a big folder would mail one line per old output
            self.debug(f"skip {record.input}: {record.reason}")
        elif status == PLANNED:
            self.info(f"plan {record.input} -> {record.output or 'stdout'}{_sizes(record)}")
        elif status == CANCELLED:
            self.debug(f"cancelled {record.input}: {record.reason}")

    def summary(self, summary: Summary) -> None:
        """The summary: a JSON object on stdout with --json, and a line on stderr, or kept in
        `held_summary` while `hold_summary` is set (to follow the error that stopped the batch)."""
        if self._live:
            self._live.stop()
            self._live = None
        if self.json_lines:
            self._result(json.dumps(summary.to_json(), default=str))
        counts = summary.counts
        other = summary.extra.get(SKIPPED_OTHER_SETTINGS) or 0
        notes = {
            SKIPPED: f" ({other} made with other settings: --on-exists if-stale makes them again)" if other else ""
        }
        parts = [
            f"{counts[s]} {s}{notes.get(s, '')}"
            for s in (DONE, PLANNED, SKIPPED, FAILED, COLLISION, CANCELLED, INTERRUPTED)
            if counts[s]
        ]
        line = f"{', '.join(parts) or 'no images'} in {_duration(summary.seconds)}"
        if self.hold_summary:
            self.held_summary = line if self.verbosity >= NORMAL else None
        else:
            self.info(line)

    # -- progress
    def start_job(self, job: Job, done: int, total: int) -> None:
        self._job_started = self._last_line = time.monotonic()
        eta = self._eta(total - done)
        if self._live:
            self._live.start_job(str(job.source), done, total)
        elif self.verbosity >= NORMAL:
            self._line(f"[{done + 1}/{total}] {job.source}" + (f" (eta {eta})" if eta else ""))

    def progress(self, stage: str, done: int, total: int) -> None:
        if self._live:
            self._live.update(stage, done, total)
            return
        now = time.monotonic()
        if self.verbosity >= VERBOSE or (self.verbosity >= NORMAL and now - self._last_line >= PLAIN_PROGRESS_EVERY):
            if stage in ("tile", "write") and self.verbosity < VERBOSE:  # a line each only with -v
                return
            self._last_line = now
            self._line(f"  {stage} {done}/{total}")

    def end_job(self) -> None:
        self._image_seconds.append(time.monotonic() - self._job_started)
        if self._live:
            self._live.end_job()

    def end_stage(self, stage: str) -> None:
        """A stage reported outside any job (e.g. captions before the first image) is over."""
        if self._live:
            self._live.end_stage(stage)

    def _eta(self, remaining: int) -> str | None:
        if not self._image_seconds:
            return None
        return _duration(sum(self._image_seconds) / len(self._image_seconds) * remaining)


class _LiveProgress:
    """Rich bars on a terminal: images (with ETA), the current image's steps, and its tiles."""

    def __init__(self, stream: TextIO):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = Console(file=stream, stderr=True)
        # Rich redirects stdout around its bars; only right when stdout is the same screen. Piped
        # or redirected to a file, results must go there, not to the terminal.
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
            redirect_stdout=sys.stdout.isatty(),
        )
        self.images: TaskID | None = None
        self.stages: dict[str, TaskID] = {}
        self.progress.start()

    def start_job(self, name: str, done: int, total: int) -> None:
        if self.images is None:
            self.images = self.progress.add_task("images", total=total, completed=done)
        self.progress.update(self.images, description=f"images  {name}")

    def update(self, stage: str, done: int, total: int) -> None:
        if stage not in self.stages:
            self.stages[stage] = self.progress.add_task(f"  {stage}s", total=total)
        self.progress.update(self.stages[stage], completed=done, total=total)

    def end_stage(self, stage: str) -> None:
        if stage in self.stages:
            self.progress.remove_task(self.stages.pop(stage))

    def end_job(self) -> None:
        for task in self.stages.values():
            self.progress.remove_task(task)
        self.stages.clear()
        if self.images is not None:
            self.progress.advance(self.images)

    def stop(self) -> None:
        self.progress.stop()
