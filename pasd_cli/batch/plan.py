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

from ..atomic import NAME_MAX
from ..errors import InputError, PasdError, UsageError
from ..imageio import FILE_OUTPUT_FORMATS, IMAGE_SUFFIXES, OTHER_IMAGE_SUFFIXES, OUTPUT_FORMATS
from .failures import FailureLog
from .inputs import Discovery
from .settings import BatchSettings
from .sizes import is_size_refusal, size_refusal

if TYPE_CHECKING:
    from ..imageio import ImageInfo

# Job and record statuses.
TODO, DONE, SKIPPED, FAILED = "todo", "done", "skipped", "failed"
PLANNED, COLLISION, CANCELLED, INTERRUPTED = "planned", "collision", "cancelled", "interrupted"
FAILING = (FAILED, COLLISION, INTERRUPTED)
OUTPUT_EXISTS = "output exists"

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
    working_size: Size | None = None  # the image the model works on, likewise (sizes.py)
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


def output_file(options: BatchSettings) -> Path | None:
    """The one result's file when -o names one (`-o photo_big.png`): its suffix is an output
    format's and no folder has that name. None: -o is a folder (or stdout)."""
    if options.to_stdout:
        return None
    path = Path(options.output)
    return path if path.suffix.lower() in FILE_OUTPUT_FORMATS and not path.is_dir() else None


def output_folder(options: BatchSettings) -> Path | None:
    """Where results (and the failure log) go: -o, or the folder of the file -o names."""
    if options.to_stdout:
        return None
    file = output_file(options)
    return Path(options.output) if file is None else file.parent


def plan_jobs(
    discovery: Discovery,
    options: BatchSettings,
    name_fields: dict[str, str],
    failures: FailureLog | None = None,
    output_size: Callable[[Size], Size | None] | None = None,
    working_size: Callable[[Size], Size | None] | None = None,
    owns: Callable[[Job], bool] | None = None,
) -> Plan:
    """Every input becomes a job: to do, skipped or failed, with its reason; nothing is decoded.
    `output_size(input_size)` and `working_size(input_size)` are the command's size rules, for
    the plan's records and the pixel limit (`sizes.py`). Inputs that fail here are remembered in
    `failures` when this worker `owns` them (default: all): a worker of a shard remembers only
    its own, which it reports, so that none is skipped unreported later."""
    from ..imageio import output_format, probe

    check_name_template(options.name, name_fields)
    jobs = [
        Job(item.path, Path(item.path.name), True, status=SKIPPED, reason=item.reason)
        for item in discovery.ignored
        if item.image_like
    ]
    if options.to_stdout and len(discovery.candidates) != 1:
        raise UsageError(f"-o - writes one image to stdout, but {len(discovery.candidates)} inputs were given")
    out_dir = output_folder(options)
    out_file = output_file(options)
    suffix = Path(options.output).suffix.lower()
    unwritable = suffix in (IMAGE_SUFFIXES | OTHER_IMAGE_SUFFIXES) and suffix not in FILE_OUTPUT_FORMATS
    if out_dir is not None and out_file is None and unwritable and not out_dir.is_dir():
        # `-o photo_big.bmp` would silently become a folder of that name
        raise UsageError(
            f"-o {options.output}: pasd cannot write {suffix} files",
            hint="name the output " + ", ".join(sorted(FILE_OUTPUT_FORMATS)) + ", or name a folder",
        )
    if out_file is not None and len(discovery.candidates) != 1:
        raise UsageError(
            f"-o {out_file} names one image file, but {len(discovery.candidates)} inputs were given",
            hint="name a folder for the results (without an image suffix)",
        )
    remember = failures is not None and not options.retry_failed and options.on_exists != "overwrite"
    for candidate in discovery.candidates:
        job = Job(candidate.path, candidate.rel, candidate.found)
        jobs.append(job)
        known = failures.known(job.source) if failures is not None and remember and job.found else None
        if known and not is_size_refusal(known):  # the limit and the sizes may have changed since
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
        if out_file is not None:  # its suffix decides the format
            job.format, job.output = FILE_OUTPUT_FORMATS[out_file.suffix.lower()], out_file
        elif out_dir is not None:
            folder = out_dir / job.rel.parent if options.recursive else out_dir
            job.output = folder / _output_name(options.name, job.source, name_fields, OUTPUT_FORMATS[job.format].suffix)
        job.working_size = working_size(job.info.size) if working_size else None
        if job.working_size:
            job.extra["working_size"] = list(job.working_size)
        refusal = size_refusal(job.output_size, job.working_size, options.max_pixels)
        if refusal and known:  # refused before for the same reason: reported once, like a broken file
            job.status, job.reason = SKIPPED, f"failed before and unchanged since: {refusal}"
        elif refusal:
            job.status, job.reason = FAILED, refusal
            if failures is not None and job.found and (owns is None or owns(job)):
                failures.record(job.source, refusal)
    _check_name_lengths(jobs, out_dir)
    plan = Plan(jobs)
    _find_collisions(plan)
    if out_dir is not None:
        _apply_on_exists(plan, options.on_exists)
    return plan


def name_max(folder: Path) -> int:
    """The longest file name, in bytes, the file system of `folder` (or of its nearest existing
    parent) takes."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    try:
        return int(os.pathconf(existing, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows), or no answer
        return NAME_MAX


def _check_name_lengths(jobs: list[Job], out_dir: Path | None) -> None:
    """An output name the file system would refuse fails its input now, before any model work
    (a --name template, or a long input name): not remembered, the input is not at fault."""
    if out_dir is None:
        return
    limit = name_max(out_dir)
    for job in jobs:
        if job.status == TODO and job.output is not None:
            size = len(os.fsencode(job.output.name))
            if size > limit:
                job.status = FAILED
                job.reason = (
                    f"the output name is {size} bytes, more than the file system's {limit}: "
                    "use a shorter --name (or rename the input)"
                )


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
            if on_exists in ("skip", "if-stale"):  # if-stale: the stale ones go back to do (staleness.py)
                job.status, job.reason = SKIPPED, OUTPUT_EXISTS
            elif on_exists == "error":
                job.status, job.reason = FAILED, "output exists (--on-exists error)"


def collision_error(collisions: list[str], consequence: str) -> UsageError:
    return UsageError(
        f"{len(collisions)} output name collision(s), {consequence}: {collisions[0]}",
        hint='make names unique, e.g. --name "{stem}_{ext}"',
    )
