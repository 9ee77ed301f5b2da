"""Planning a batch: every input becomes a job, to do, skipped or failed, with its output path,
its planned size and the reason for anything but "to do"; collisions refuse the run. Only image
headers are read."""

from __future__ import annotations

import os
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError, PasdError, UsageError
from ..imageio import OUTPUT_FORMATS
from .failures import FailureLog
from .inputs import Discovery
from .settings import BatchSettings

if TYPE_CHECKING:
    from ..imageio import ImageInfo

# Job and record statuses.
TODO, DONE, SKIPPED, FAILED = "todo", "done", "skipped", "failed"
PLANNED, COLLISION, CANCELLED, INTERRUPTED = "planned", "collision", "cancelled", "interrupted"
FAILING = (FAILED, COLLISION, INTERRUPTED)

Size = tuple[int, int]
# Why an earlier run's output, found again by a walk of the folder that holds -o, is no input.
WRITTEN_BY_PASD = "written by pasd (inside the output folder)"


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
    output_size: Size | None = None  # as planned from the header
    extra: dict[str, Any] = field(default_factory=dict)  # fields a pre-pass adds to this job's record


@dataclass
class Plan:
    jobs: list[Job]
    collisions: list[str] = field(default_factory=list)

    @property
    def todo(self) -> list[Job]:
        return [job for job in self.jobs if job.status == TODO]


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
    name = template.format(stem=source.stem, ext=source.suffix.lower().lstrip("."), **fields)
    if "/" in name or "\\" in name or name in ("", ".", ".."):
        raise UsageError(f"--name {template!r} gives {name!r} for {source}: not a file name")
    return name + suffix


def plan_jobs(
    discovery: Discovery,
    options: BatchSettings,
    name_fields: dict[str, str],
    failures: FailureLog | None = None,
    output_size: Callable[[Size], Size | None] | None = None,
    owns: Callable[[Job], bool] | None = None,
) -> Plan:
    """Every input becomes a job: to do, skipped or failed, with its reason; nothing is decoded.
    `output_size(input_size)` is the command's size rule, for the plan's records. Inputs that
    fail here are remembered in `failures` when `owns` them (default: all): a worker of a shard
    remembers only its own, which it reports, so that none is skipped unreported later."""
    from ..imageio import output_format, probe

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
        known = failures.known(job.source) if failures is not None and remember and job.found else None
        if known:
            job.status, job.reason = SKIPPED, f"failed before and unchanged since: {known}"
            continue
        try:
            job.info = probe(job.source)
        except InputError as exc:
            job.status, job.reason = FAILED, reason_of(exc, job.source)
            if failures is not None and job.found and exc.about_content and (owns is None or owns(job)):
                failures.record(job.source, job.reason)
            continue
        if job.found and job.info.by_pasd and out_dir is not None and _inside(job.source, out_dir):
            job.status, job.reason = SKIPPED, WRITTEN_BY_PASD
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


def reason_of(exc: PasdError, source: Path) -> str:
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
    file), or an output that is an input, are refused before any work. An earlier run's output
    found inside -o is no input: writing it again is --on-exists's business."""
    inputs = {os.path.realpath(job.source): job for job in plan.jobs if job.reason != WRITTEN_BY_PASD}
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
        assert job.output is not None  # every job has an output path when -o is a folder
        if job.output.is_dir():
            job.status, job.reason = FAILED, f"a folder is in the way of {job.output}"
        elif job.output.exists() or job.output.is_symlink():
            if on_exists == "skip":
                job.status, job.reason = SKIPPED, "output exists"
            elif on_exists == "error":
                job.status, job.reason = FAILED, "output exists (--on-exists error)"


def collision_error(collisions: list[str], consequence: str) -> UsageError:
    return UsageError(
        f"{len(collisions)} output name collision(s), {consequence}: {collisions[0]}",
        hint='make names unique, e.g. --name "{stem}_{ext}"',
    )
