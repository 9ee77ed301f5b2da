"""The batch runner every command shares. It owns a command's lifecycle (see `command.py`):

    run_batch     check -o, hold --lock, plan, refuse collisions, execute, report collisions
    plan_batch    inputs -> jobs with their outputs, skips and failures, from image headers
    execute       resolve models and run the pre-pass (when some job is left to do), then each
                  job in order, one record each, and the summary

A worker's share of the jobs (`--shard`, see `shard.py`) is a filter of the whole plan between
`plan_batch` and `execute`; workers started together (torchrun) also meet at the end, so that
rank 0 reports one summary (`world.py`). A lock and size limits belong to `run_batch` and the
planner.

Errors about one input fail that job and the batch goes on (it stops with --fail-fast); any
other PasdError (model, device, interrupt) stops the batch: the remaining jobs are recorded as
cancelled, the summary is reported, and the error propagates to the command line.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from ..atomic import _FULL_DISK as FULL_DISK
from ..atomic import remove_stale
from ..errors import DeviceError, InputError, Interrupted, PasdError, UsageError
from ..interrupts import deferred
from .command import Command, Pending
from .failures import FailureLog
from .inputs import find_inputs
from .lock import hold_lock
from .plan import (
    CANCELLED,
    COLLISION,
    DONE,
    FAILED,
    INTERRUPTED,
    PLANNED,
    TODO,
    Job,
    Plan,
    collision_error,
    output_folder,
    plan_jobs,
    reason_of,
)
from .records import JobRecord, JobResult, Summary
from .report import Reporter
from .settings import BatchSettings
from .staleness import SKIPPED_OTHER_SETTINGS, mark_stale
from .world import Finish, Meeting

FAIL_FAST_STOPPED = "not started: --fail-fast stopped the batch"


def run_batch(command: Command, options: BatchSettings, stdin: TextIO | None = None) -> Summary:
    """Discover, plan and run `command` over the inputs of `options` (this worker's share of them
    with a shard); the summary's exit code says whether some input failed. With other workers
    (`options.world`), rank 0 returns the merged summary. `stdin` holds the paths for an input
    `-` (default: sys.stdin)."""
    _check_destination(options)
    reporter = Reporter(verbosity=options.verbosity, json_lines=options.json, paths_to_stdout=not options.to_stdout)
    world = options.world
    meeting = Meeting(world) if world is not None and world.size > 1 else None
    finish = Finish(reporter, meeting, command)
    try:
        with hold_lock(_lock_path(options)):
            summary, plan = _run_locked(command, options, reporter, finish, stdin or sys.stdin)
    except BaseException as exc:
        if not finish.called and meeting is not None:
            meeting.leave(str(exc) or type(exc).__name__)  # the others stop waiting for this worker
        raise
    if plan.collisions:  # a dry run lists them all first, then the error, then the summary
        error = collision_error(plan.collisions, "a run would refuse to start")
        error.epilogue = reporter.held_summary
        raise error
    return finish.result if finish.result is not None else summary


def _run_locked(
    command: Command, options: BatchSettings, reporter: Reporter, finish: Finish, stdin: TextIO
) -> tuple[Summary, Plan]:
    folder = output_folder(options)
    shard = options.shard
    failures = None if folder is None else FailureLog(folder, writable=not options.dry_run)
    if failures is not None:
        failures.forget_where(command.retries)
    owns = None if shard is None else lambda job: shard.owns(job, folder)
    plan = plan_batch(command, options, reporter, failures, stdin, owns)
    if plan.collisions and not options.dry_run:
        raise collision_error(plan.collisions, "nothing done")
    if shard is not None:
        plan = shard.share(plan, folder)
    summary = Summary()
    if folder is not None:  # after the share: each worker compares the outputs it owns
        summary.extra[SKIPPED_OTHER_SETTINGS] = mark_stale(plan, options.on_exists, command.fingerprint)
    if folder is not None and plan.todo and not options.dry_run:
        _try_writing(folder, options.output)
    if folder is not None and not options.dry_run:
        _remove_stale_temporaries(plan, folder, reporter)
    reporter.hold_summary = bool(plan.collisions)
    return execute(command, plan, reporter, options, failures, summary, finish=finish), plan


def _lock_path(options: BatchSettings) -> str | None:
    if options.lock and options.shard is not None:
        return options.shard.lock_path(options.lock)
    return options.lock


def plan_batch(
    command: Command,
    options: BatchSettings,
    reporter: Reporter,
    failures: FailureLog | None,
    stdin: TextIO,
    owns: Callable[[Job], bool] | None = None,
) -> Plan:
    """The whole plan; `owns` says which of its jobs this worker may add to the failure memory."""
    discovery = find_inputs(options.inputs, options.recursive, stdin=stdin if "-" in options.inputs else None)
    for item in discovery.ignored:
        if not item.image_like:  # image-like ones are reported as skipped inputs
            reporter.debug(f"ignore {item.path}: {item.reason}")
    for spec in discovery.empty_specs:
        reporter.warn(f"{spec}: no images found")
    return plan_jobs(
        discovery,
        options,
        command.name_fields(),
        failures,
        command.planned_size,
        command.planned_working_size,
        owns,
    )


def execute(
    command: Command,
    plan: Plan,
    reporter: Reporter,
    options: BatchSettings,
    failures: FailureLog | None = None,
    summary: Summary | None = None,
    finish: Finish | None = None,
) -> Summary:
    """Run the plan's jobs in order. The command's models are resolved and its pre-pass run once,
    before the first job, only when some job is left to do; its model loads on the first job
    that needs it (never in a dry run). `finish` says which summary to report (default: this
    run's)."""
    finish = finish or Finish(reporter)
    return _Run(command, plan, reporter, options, failures, summary or Summary(), finish).run()


def _check_destination(options: BatchSettings) -> None:
    """Before any work, and without making anything: an -o that cannot be written fails now, not
    image by image after the model has loaded."""
    if options.to_stdout:
        if not options.dry_run and sys.stdout.isatty():
            raise UsageError(
                "-o - writes the image's bytes to stdout, which is the terminal",
                hint="redirect it to a file or a program: pasd upscale photo.jpg -o - > big.png",
            )
        return
    folder = output_folder(options)
    assert folder is not None  # not stdout
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p.is_symlink())
    where = "" if existing == folder else f" ({existing} is in its path)"
    if not existing.is_dir():
        raise UsageError(f"-o {folder}: not a folder{where}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"-o {folder}: not writable{where}")


def _remove_stale_temporaries(plan: Plan, out_dir: Path, reporter: Reporter) -> None:
    """Temporary files that a killed run (kill -9, a power loss) left in the folders this run
    writes to: only ours, by name, and only those no writer holds, so never one that another
    run is writing now, with --lock or without (see `atomic`)."""
    folders = {out_dir, *(job.output.parent for job in plan.jobs if job.output is not None)}
    for folder in sorted(folders):
        for path in remove_stale(folder):
            reporter.info(f"removed {path}, left by an interrupted run")


def _try_writing(folder: Path, given: str) -> None:
    """Write and remove a file in `folder` before any model is resolved or loaded: permissions
    (root passes every access check), a read-only mount or a pseudo file system (/proc) show
    only when something is written. Folders made for it are removed again."""
    made = [p for p in (folder, *folder.parents) if not (p.exists() or p.is_symlink())]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".pasd-", suffix=".probe", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        if exc.errno in FULL_DISK:
            raise DeviceError(f"-o {given}: cannot write there ({exc.strerror}: disk full or quota exceeded)") from None
        raise UsageError(f"-o {given}: cannot write there ({exc.strerror or exc})") from None
    finally:
        for path in made:
            try:
                path.rmdir()
            except OSError:
                break


class _Run:
    """One execution of a plan: the loop over its jobs and the records it emits."""

    def __init__(
        self,
        command: Command,
        plan: Plan,
        reporter: Reporter,
        options: BatchSettings,
        failures: FailureLog | None,
        summary: Summary,
        finish: Finish,
    ):
        self.command, self.plan, self.reporter, self.options = command, plan, reporter, options
        self.failures, self.summary, self.finish = failures, summary, finish
        self.todo_total = 0
        self.todo_done = 0
        self.loaded = False
        self.stop_reason: str | None = None

    def run(self) -> Summary:
        started = time.monotonic()
        stopped: PasdError | None = None
        failure: BaseException | None = None
        try:
            if self.plan.todo:
                self._prepare()
            self.todo_total = len(self.plan.todo)
            for job in self.plan.jobs:
                self._step(job)
            if self.loaded:
                self.command.close(self.reporter)
        except (PasdError, Interrupted) as exc:
            failure = exc
            with deferred():  # a second Ctrl-C must not cut the account of the inputs short
                if isinstance(exc, PasdError):
                    stopped = exc
                self.summary.error = str(exc)
                emitted = sum(self.summary.counts.values())
                for job in self.plan.jobs[emitted:]:
                    self._emit(job, CANCELLED, f"not started: {exc}")
            raise
        except BaseException as exc:
            failure = exc
            raise
        finally:
            with deferred():
                self.summary.seconds = time.monotonic() - started
                self._save_failures()
            # Meeting the other workers may wait for them: an interrupt must still get through.
            shown, error = self.finish.meet(self.summary, failure)
            with deferred():
                stopped = stopped or (error if isinstance(error, PasdError) else None)
                if stopped is not None:  # the command line says the summary after the error
                    self.reporter.hold_summary = True
                if shown is not None:
                    self.reporter.summary(shown)
                if stopped is not None:
                    stopped.epilogue = self.reporter.held_summary
            if error is not None:
                raise error
        return self.summary

    def _prepare(self) -> None:
        """Before the loop: the command's models, then its pre-pass over the jobs to do."""
        self.command.resolve(self.reporter, self.options.dry_run)
        pending = Pending(
            self.plan.todo, self.plan, self.reporter, self.summary, self.options.dry_run, self._fail_early
        )
        self.command.prepass(pending)

    def _step(self, job: Job) -> None:
        if self.stop_reason:
            self._emit(job, CANCELLED, self.stop_reason)
        elif job.status != TODO:
            self._emit(job, job.status, job.reason)
            if job.status in (FAILED, COLLISION) and self.options.fail_fast:
                self.stop_reason = FAIL_FAST_STOPPED
        elif self.options.dry_run:
            self._emit(job, PLANNED)
        else:
            self._work(job)

    def _work(self, job: Job) -> None:
        if not self.loaded:
            self.command.load(self.reporter)
            self.loaded = True
        self.reporter.start_job(job, self.todo_done, self.todo_total)
        begin = time.monotonic()
        try:
            result = self.command.work(job, self.reporter.progress)
        except InputError as exc:
            reason = reason_of(exc, job.source)
            self._remember(job, exc, reason)
            self._emit(job, FAILED, reason, time.monotonic() - begin)
            if self.options.fail_fast:
                self.stop_reason = FAIL_FAST_STOPPED
        except (PasdError, Interrupted) as exc:
            status = INTERRUPTED if isinstance(exc, Interrupted) else FAILED
            with deferred():
                self._emit(job, status, str(exc), time.monotonic() - begin)
            raise
        except Exception as exc:  # a bug on one image must not cost the rest of the batch
            self.reporter.debug(traceback.format_exc())
            self._emit(job, FAILED, f"unexpected {type(exc).__name__}: {exc}", time.monotonic() - begin)
        else:
            if self.failures is not None:
                self.failures.forget(job.source)
            self._emit(job, DONE, None, time.monotonic() - begin, result)
        finally:
            self.todo_done += 1
            self.reporter.end_job()

    def _fail_early(self, job: Job, error: InputError, remember: bool) -> bool:
        """A pre-pass failed `job`: it is reported in its turn, as if its work had failed."""
        job.status, job.reason = FAILED, reason_of(error, job.source)
        if remember:
            self._remember(job, error, job.reason)
        return self.options.fail_fast

    def _remember(self, job: Job, error: InputError, reason: str) -> None:
        """Inputs found in folders that failed for what they contain are skipped next time."""
        if self.failures is not None and job.found and error.about_content:
            self.failures.record(job.source, reason)

    def _emit(
        self,
        job: Job,
        status: str,
        reason: str | None = None,
        seconds: float | None = None,
        result: JobResult | None = None,
    ) -> None:
        self.summary.counts[status] += 1
        if status == DONE and result is not None and seconds is not None:
            self.summary.add_made(seconds, result.output_size)
        planned = job.output_size if status == PLANNED else None
        self.reporter.record(
            JobRecord(
                input=str(job.source),
                output=None if job.output is None else str(job.output),
                status=status,
                reason=reason,
                seconds=seconds,
                input_size=job.info.size if job.info else None,
                output_size=result.output_size if result else planned,
                seed=self.command.seed,
                extra={**job.extra, **(result.extra if result else {})},
            )
        )

    def _save_failures(self) -> None:
        if self.failures is None:
            return
        try:
            self.failures.save()
        except PasdError as exc:  # only costs a re-run its memory; the summary must still come
            self.reporter.warn(f"{exc} (inputs that failed will be tried again next time)")
