"""The batch runner every image command shares: plan (inputs -> jobs with their outputs, skips
and collisions, from image headers only), then run a per-job callable over the plan, one JSON
record per input and a summary at the end.

A command supplies three things: `name_fields` for `--name` (e.g. {"scale": "4"}), a `prepare()`
that loads its model once and returns a `Worker`, and the seed it records. Nothing here imports
torch; a plan whose jobs are all skipped never calls `prepare()`.
"""

from __future__ import annotations

import json
import os
import string
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import write_atomic
from ..errors import DeviceError, InputError, Interrupted, OutputError, PasdError, UsageError
from ..imageio.images import OUTPUT_FORMATS, ImageInfo, output_format, probe
from .inputs import Discovery
from .settings import BatchSettings

FAILURES_FILE = ".pasd-failures.json"

# Job and record statuses.
TODO, DONE, SKIPPED, FAILED = "todo", "done", "skipped", "failed"
PLANNED, COLLISION, CANCELLED, INTERRUPTED = "planned", "collision", "cancelled", "interrupted"
FAILING = (FAILED, COLLISION, INTERRUPTED)
FAIL_FAST_STOPPED = "not started: --fail-fast stopped the batch"


@dataclass
class Job:
    source: Path
    rel: Path  # relative place below its input root, mirrored under -o with --recursive
    found: bool  # found by a folder walk or a glob (not named)
    output: Path | None = None  # None: stdout, or nothing to write
    format: str | None = None  # key of imageio.OUTPUT_FORMATS
    info: ImageInfo | None = None
    status: str = TODO
    reason: str | None = None
    output_size: tuple[int, int] | None = None  # as planned from the header
    extra: dict = field(default_factory=dict)  # fields a pre-pass adds to this job's record


@dataclass
class Plan:
    jobs: list[Job]
    collisions: list[str] = field(default_factory=list)

    @property
    def todo(self) -> list[Job]:
        return [job for job in self.jobs if job.status == TODO]


@dataclass
class JobResult:
    """What a worker returns for a finished job; `extra` goes into the JSON record (e.g. prompt)."""

    output_size: tuple[int, int]
    extra: dict = field(default_factory=dict)


# progress(stage, done, total): stage is "step" or "tile", as the engine reports it.
Progress = Callable[[str, int, int], None]
Worker = Callable[[Job, Progress], JobResult]


@dataclass
class JobRecord:
    input: str
    output: str | None
    status: str
    reason: str | None = None
    seconds: float | None = None
    input_size: tuple[int, int] | None = None
    output_size: tuple[int, int] | None = None
    seed: int | None = None
    extra: dict = field(default_factory=dict)  # command-specific fields, e.g. "prompt"

    def to_json(self) -> dict:
        record = {
            "type": "image",
            "input": self.input,
            "output": self.output,
            "status": self.status,
            "reason": self.reason,
            "seconds": None if self.seconds is None else round(self.seconds, 3),
            "input_size": list(self.input_size) if self.input_size else None,
            "output_size": list(self.output_size) if self.output_size else None,
            "seed": self.seed,
        }
        record.update(self.extra)
        return record


@dataclass
class Summary:
    counts: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    error: str | None = None  # the fatal error that stopped the batch
    extra: dict = field(default_factory=dict)  # counters other commands add (e.g. caption cache hits)

    @property
    def exit_code(self) -> int:
        return 1 if any(self.counts[status] for status in FAILING) else 0

    def to_json(self) -> dict:
        statuses = (DONE, SKIPPED, FAILED, PLANNED, COLLISION, CANCELLED, INTERRUPTED)
        summary = {
            "type": "summary",
            "total": sum(self.counts.values()),
            **{status: self.counts[status] for status in statuses},
            "seconds": round(self.seconds, 3),
            "error": self.error,
        }
        summary.update(self.extra)
        return summary


# ---------------------------------------------------------------------------------- planning


def check_name_template(template: str, fields: dict[str, str]) -> None:
    allowed = {"stem", "ext", *fields}
    try:
        used = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise UsageError(f"--name {template!r}: {exc}") from None
    unknown = used - allowed
    if unknown or "" in used:
        raise UsageError(
            f"--name {template!r}: unknown field {{{sorted(unknown)[0] if unknown else ''}}}",
            hint="fields: " + ", ".join("{" + f + "}" for f in sorted(allowed)),
        )
    try:  # every field is a string, so a format spec that fails here fails for every input
        template.format(**{name: "x" for name in allowed})
    except (ValueError, TypeError) as exc:
        raise UsageError(
            f"--name {template!r}: {exc}",
            hint='every field is text ({scale} is "4"): number formats such as {scale:d} do not apply',
        ) from None


def _output_name(template: str, source: Path, fields: dict[str, str], suffix: str) -> str:
    stem = source.stem
    name = template.format(stem=stem, ext=source.suffix.lower().lstrip("."), **fields)
    if "/" in name or "\\" in name or name in ("", ".", ".."):
        raise UsageError(f"--name {template!r} gives {name!r} for {source}: not a file name")
    return name + suffix


def plan_jobs(
    discovery: Discovery,
    options: BatchSettings,
    name_fields: dict[str, str],
    failures: FailureLog | None = None,
    output_size: Callable[[tuple[int, int]], tuple[int, int]] | None = None,
) -> Plan:
    """Every input becomes a job: to do, skipped or failed, with its reason; nothing is decoded.
    `output_size(input_size)` is the command's size rule, for the plan's records."""
    check_name_template(options.name, name_fields)
    jobs = [
        Job(item.path, Path(item.path.name), True, status=SKIPPED, reason=item.reason)
        for item in discovery.ignored
        if item.image_like
    ]
    if options.to_stdout and len(discovery.candidates) != 1:
        raise UsageError(f"-o - writes one image to stdout, but {len(discovery.candidates)} inputs were given")
    out_dir = None if options.to_stdout else Path(options.output)
    remember = failures is not None and not options.retry_failed and options.on_exists != "overwrite"
    for candidate in discovery.candidates:
        job = Job(candidate.path, candidate.rel, candidate.found)
        jobs.append(job)
        known = failures.known(job.source) if remember and job.found else None
        if known:
            job.status, job.reason = SKIPPED, f"failed before and unchanged since: {known}"
            continue
        try:
            job.info = probe(job.source)
        except InputError as exc:
            job.status, job.reason = FAILED, _reason(exc, job.source)
            if failures is not None and job.found:
                failures.record(job.source, job.reason)
            continue
        if job.found and job.info.by_pasd and out_dir is not None and _inside(job.source, out_dir):
            job.status, job.reason = SKIPPED, "written by pasd (inside the output folder)"
            continue
        job.format = output_format(options.format, job.info)
        job.output_size = output_size(job.info.size) if output_size else None
        if out_dir is not None:
            folder = out_dir / job.rel.parent if options.recursive else out_dir
            job.output = folder / _output_name(options.name, job.source, name_fields, OUTPUT_FORMATS[job.format].suffix)
    plan = Plan(jobs)
    _find_collisions(plan)
    if out_dir is not None:
        _apply_on_exists(plan, options.on_exists)
    return plan


def _reason(exc: PasdError, source: Path) -> str:
    """The error message without the leading path: records carry the path already."""
    text = str(exc)
    prefix = f"{source}: "
    return text[len(prefix) :] if text.startswith(prefix) else text


def _inside(path: Path, folder: Path) -> bool:
    try:
        Path(os.path.realpath(path)).relative_to(os.path.realpath(folder))
        return True
    except ValueError:
        return False


def _find_collisions(plan: Plan) -> None:
    """Two inputs to one output (compared case-insensitively: on macOS and Windows they are one
    file), or an output that is an input, are refused before any work."""
    inputs = {os.path.realpath(job.source): job for job in plan.jobs}
    by_output: dict[str, list[Job]] = {}
    for job in plan.jobs:
        if job.output is not None and job.status == TODO:
            by_output.setdefault(os.path.realpath(job.output).casefold(), []).append(job)
    for group in by_output.values():
        if len(group) > 1:
            names = ", ".join(str(job.source) for job in group)
            message = f"{names} would all be written to {group[0].output}"
            plan.collisions.append(message)
            for job in group:
                job.status, job.reason = COLLISION, message
    for job in plan.jobs:
        if job.output is not None and os.path.realpath(job.output) in inputs and job.status == TODO:
            message = f"{job.source} would be written over the input {job.output}"
            plan.collisions.append(message)
            job.status, job.reason = COLLISION, message


def _apply_on_exists(plan: Plan, on_exists: str) -> None:
    for job in plan.todo:
        if job.output.is_dir():
            job.status, job.reason = FAILED, f"a folder is in the way of {job.output}"
        elif job.output.exists() or job.output.is_symlink():
            if on_exists == "skip":
                job.status, job.reason = SKIPPED, "output exists"
            elif on_exists == "error":
                job.status, job.reason = FAILED, "output exists (--on-exists error)"


# ------------------------------------------------------------------------------ failure memory


class FailureLog:
    """Inputs found in folders or globs that failed for what they contain, kept beside the outputs
    (`-o DIR/.pasd-failures.json`), so a re-run over the folder skips them while they are unchanged
    (same size and modification time) instead of failing on them again: a cron job reports a bad
    file once. Inputs named on the command line or on stdin are always tried; so are all of them
    with `--retry-failed` or `--on-exists overwrite`."""

    def __init__(self, out_dir: Path, writable: bool = True):
        self.path = Path(out_dir) / FAILURES_FILE
        self.writable = writable  # a dry run reads it and writes nothing
        self.entries: dict[str, dict] = {}
        self.changed = False
        try:
            self.entries = json.loads(self.path.read_text()).get("failures", {})
        except (OSError, ValueError, AttributeError):
            self.entries = {}

    @staticmethod
    def _key(source: Path) -> str:
        return os.path.realpath(source)

    @staticmethod
    def _identity(source: Path) -> dict | None:
        try:
            stat = source.stat()
        except OSError:
            return None
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    def known(self, source: Path) -> str | None:
        entry = self.entries.get(self._key(source))
        identity = self._identity(source)
        if entry and identity and all(entry.get(k) == v for k, v in identity.items()):
            return entry.get("reason")
        return None

    def record(self, source: Path, reason: str) -> None:
        identity = self._identity(source)
        if identity is not None:
            self.entries[self._key(source)] = {**identity, "reason": reason}
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


# --------------------------------------------------------------------------------------- lock


@contextmanager
def hold_lock(path: str | None) -> Iterator[None]:
    """`--lock FILE`: refuse to start while another run holds FILE. The OS drops the lock when the
    holder exits, however it exits, so a crashed run never blocks the next one."""
    if not path:
        yield
        return
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise UsageError(f"--lock {path}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise DeviceError(
                f"another pasd run holds the lock {path} (pid {holder})",
                hint="wait for it to finish; the lock is released when it exits",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------- execution


@dataclass
class Pending:
    """What a command's pre-pass sees before the per-job loop: the jobs still to do (in order),
    the whole plan, and the reporter and summary of the run. A pre-pass prepares what every job
    needs before the model loads (e.g. captions, so the captioner and the diffusion model are
    never in memory together); it may add record fields to `job.extra` and counters to
    `summary.extra`, and fail single jobs with `fail`."""

    jobs: list[Job]
    plan: Plan
    reporter: object
    summary: Summary
    _fail: Callable[[Job, InputError, bool], bool]

    def fail(self, job: Job, error: InputError, remember: bool = True) -> bool:
        """The job fails as if its worker had raised `error`; `remember=False` keeps it out of the
        failure log (the error is not about the image's content, e.g. a bad sidecar file).
        Returns True when the batch stops there (--fail-fast): the pre-pass should stop too."""
        return self._fail(job, error, remember)


def run_jobs(
    plan: Plan,
    prepare: Callable[[], Worker],
    reporter,
    options: BatchSettings,
    seed: int | None = None,
    failures: FailureLog | None = None,
    summary: Summary | None = None,
    prepass: Callable[[Pending], None] | None = None,
) -> Summary:
    """Run `prepare()` (once, only if there is work) and its worker over the plan's jobs, in order.
    Pass a `summary` to add counters of your own to its `extra` while the jobs run. `prepass`, when
    given, is called once with the jobs to do (dry runs included) before the loop, when there are
    any.

    Input errors fail one job and the batch goes on (stops with --fail-fast); any other PasdError
    (model, device, interrupt) stops the batch: the rest are recorded as cancelled, the summary
    is reported, and the error is raised for `cli.main` to turn into the exit code.
    """
    summary = summary if summary is not None else Summary()
    started = time.monotonic()
    worker: Worker | None = None
    todo_done = 0
    stop_reason = None

    def remember(job: Job, error: InputError, reason: str) -> None:
        """Inputs found in folders that failed for what they contain are skipped next time."""
        if failures is not None and job.found and not isinstance(error, OutputError):
            failures.record(job.source, reason)

    def fail_early(job: Job, error: InputError, remember_it: bool) -> bool:
        job.status, job.reason = FAILED, _reason(error, job.source)
        if remember_it:
            remember(job, error, job.reason)
        return options.fail_fast

    def emit(
        job: Job, status: str, reason: str | None = None, seconds: float | None = None, result: JobResult | None = None
    ) -> None:
        summary.counts[status] += 1
        reporter.record(
            JobRecord(
                input=str(job.source),
                output=None if job.output is None else str(job.output),
                status=status,
                reason=reason,
                seconds=seconds,
                input_size=job.info.size if job.info else None,
                output_size=result.output_size if result else job.output_size if status == PLANNED else None,
                seed=seed,
                extra={**job.extra, **(result.extra if result else {})},
            )
        )

    try:
        if prepass is not None and plan.todo:
            prepass(Pending(plan.todo, plan, reporter, summary, fail_early))
        todo_total = len(plan.todo)
        for job in plan.jobs:
            if stop_reason:
                emit(job, CANCELLED, stop_reason)
                continue
            if job.status != TODO:
                emit(job, job.status, job.reason)
                if job.status in (FAILED, COLLISION) and options.fail_fast:
                    stop_reason = FAIL_FAST_STOPPED
                continue
            if options.dry_run:
                emit(job, PLANNED)
                continue
            if worker is None:
                worker = prepare()
            reporter.start_job(job, todo_done, todo_total)
            begin = time.monotonic()
            try:
                result = worker(job, reporter.progress)
            except InputError as exc:
                reason = _reason(exc, job.source)
                remember(job, exc, reason)
                emit(job, FAILED, reason, time.monotonic() - begin)
                if options.fail_fast:
                    stop_reason = FAIL_FAST_STOPPED
            except PasdError as exc:
                emit(job, INTERRUPTED if isinstance(exc, Interrupted) else FAILED, str(exc), time.monotonic() - begin)
                raise
            except Exception as exc:  # a bug on one image must not cost the rest of the batch
                reporter.debug(traceback.format_exc())
                emit(job, FAILED, f"unexpected {type(exc).__name__}: {exc}", time.monotonic() - begin)
            else:
                if failures is not None:
                    failures.forget(job.source)
                emit(job, DONE, None, time.monotonic() - begin, result)
            finally:
                todo_done += 1
                reporter.end_job()
    except PasdError as exc:
        summary.error = str(exc)
        done_jobs = sum(summary.counts.values())
        for job in plan.jobs[done_jobs:]:
            emit(job, CANCELLED, f"not started: {exc}")
        raise
    finally:
        summary.seconds = time.monotonic() - started
        if failures is not None:
            try:
                failures.save()
            except PasdError as exc:  # only costs a re-run its memory; the summary must still come
                reporter.warn(f"{exc} (inputs that failed will be tried again next time)")
        reporter.summary(summary)
    return summary
