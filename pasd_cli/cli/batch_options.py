"""The batch and output options every image command shares, declared once, and the driver that
runs a command's model over its inputs.

A command opts in with `@batch_options` under `@app.command()` and takes a `batch: BatchSettings`
parameter in place of the shared options:

    @app.command(epilog=EXIT_CODES_HELP)
    @batch_options
    def stylize(batch: BatchSettings, style: str = typer.Option(...), ...):
        run_batch_command(batch, name_fields={"style": style}, seed=seed, prepare=load_my_worker)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import typer

from ..batch import settings as defaults
from ..errors import UsageError
from .option_groups import option_group

_B = defaults.BatchSettings()
_FORMAT_ALIASES = {"jpeg": "jpg", "tif": "tiff"}

# (name, default with its Typer declaration, annotation), in the order --help lists them.
_BATCH_PARAMETERS = [
    (
        "inputs",
        typer.Argument(
            ...,
            metavar="INPUT",
            show_default=False,
            help="Image files, folders, quoted globs ('photos/*.jpg'), or - to read paths from stdin, one per line.",
        ),
        list[str],
    ),
    (
        "output",
        typer.Option(..., "-o", "--output", help="Folder for the results, or - to write the single result to stdout."),
        str,
    ),
    (
        "recursive",
        typer.Option(_B.recursive, "-r", "--recursive", help="Enter subfolders; their tree is mirrored under -o."),
        bool,
    ),
    (
        "name",
        typer.Option(
            _B.name,
            "--name",
            help="Output file name without extension; fields {stem}, {ext} and the command's own, e.g. {scale}.",
        ),
        str,
    ),
    (
        "format",
        typer.Option(_B.format, "--format", help="png, jpg, webp, tiff, or same (the input's; BMP inputs give PNG)."),
        str,
    ),
    # Not "[default: ...]" in the text: Rich would take it for markup and drop it.
    (
        "quality",
        typer.Option(
            _B.quality,
            "--quality",
            min=1,
            max=100,
            show_default=False,
            help="JPEG and WebP quality (default: "
            + ", ".join(f"{q} for {f}" for f, q in defaults.DEFAULT_QUALITY.items())
            + ").",
        ),
        Optional[int],
    ),
    (
        "on_exists",
        typer.Option(
            _B.on_exists, "--on-exists", help="When an output exists: skip, overwrite, or error (fail that input)."
        ),
        str,
    ),
    (
        "retry_failed",
        typer.Option(
            _B.retry_failed,
            "--retry-failed",
            help="Try again inputs that failed in an earlier run and are unchanged since (otherwise they are skipped).",
        ),
        bool,
    ),
    ("fail_fast", typer.Option(_B.fail_fast, "--fail-fast", help="Stop at the first failed input."), bool),
    (
        "json_lines",
        typer.Option(_B.json, "--json", help="One JSON object per input on stdout, then a summary object."),
        bool,
    ),
    (
        "dry_run",
        typer.Option(
            _B.dry_run, "--dry-run", help="Plan (inputs, outputs, skips, collisions) without loading any model."
        ),
        bool,
    ),
    ("quiet", typer.Option(False, "-q", "--quiet", help="Only errors on stderr."), bool),
    ("verbose", typer.Option(False, "-v", "--verbose", help="Every step, skip and timing on stderr."), bool),
    (
        "lock",
        typer.Option(
            _B.lock,
            "--lock",
            metavar="FILE",
            show_default=False,
            help="Refuse to start while another run holds FILE (for cron).",
        ),
        Optional[str],
    ),
]


def build_batch_settings(
    inputs,
    output,
    recursive,
    name,
    format,
    quality,
    on_exists,
    retry_failed,
    fail_fast,
    json_lines,
    dry_run,
    quiet,
    verbose,
    lock,
) -> defaults.BatchSettings:
    if quiet and verbose:
        raise UsageError("-q and -v contradict each other")
    if not str(output).strip():  # `-o "$OUT"` with OUT unset must not mean the current folder
        raise UsageError("-o is empty", hint="name a folder for the results, or - for stdout")
    try:
        return defaults.BatchSettings(
            inputs=tuple(inputs),
            output=str(output),
            recursive=recursive,
            name=name,
            format=_FORMAT_ALIASES.get(format.lower(), format.lower()),
            quality=quality,
            on_exists=on_exists.lower(),
            retry_failed=retry_failed,
            fail_fast=fail_fast,
            json=json_lines,
            dry_run=dry_run,
            verbosity=0 if quiet else 2 if verbose else 1,
            lock=lock,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


# Replaces a command's `batch` parameter with the shared options, packed into a `BatchSettings`.
batch_options = option_group("batch", _BATCH_PARAMETERS, build_batch_settings)


def number_field(value: float) -> str:
    """4.0 -> "4", 2.5 -> "2.5": how a number reads in a file name."""
    return f"{value:g}"


def run_batch_command(
    batch: defaults.BatchSettings,
    name_fields: dict[str, str],
    seed: int | None,
    prepare: Callable,
    output_size: Callable | None = None,
    summary=None,
    prepass: Callable | None = None,
) -> None:
    """Discover, plan and run. `prepare(reporter)` loads the model once and returns the worker; it is
    not called when there is nothing to do (dry run, or every input skipped). `output_size(size)`
    gives planned sizes for dry runs. A `batch.Summary` passed in collects the command's own
    counters in `.extra` (they end up in the JSON summary). `prepass(batch.Pending)` runs once over
    the jobs to do before the loop (see `batch.run_jobs`). Raises typer.Exit(1) when some input
    failed; fatal errors propagate as PasdError."""
    from ..batch.inputs import find_inputs
    from ..batch.report import Reporter
    from ..batch.runner import FailureLog, hold_lock, plan_jobs, run_jobs

    if not batch.to_stdout:
        _check_output_folder(Path(batch.output))
    elif not batch.dry_run and sys.stdout.isatty():
        raise UsageError(
            "-o - writes the image's bytes to stdout, which is the terminal",
            hint="redirect it to a file or a program: pasd upscale photo.jpg -o - > big.png",
        )
    reporter = Reporter(verbosity=batch.verbosity, json_lines=batch.json, paths_to_stdout=not batch.to_stdout)
    with hold_lock(batch.lock):
        discovery = find_inputs(batch.inputs, batch.recursive, stdin=sys.stdin if "-" in batch.inputs else None)
        for item in discovery.ignored:
            if not item.image_like:  # image-like ones are reported as skipped inputs
                reporter.debug(f"ignore {item.path}: {item.reason}")
        for spec in discovery.empty_specs:
            reporter.warn(f"{spec}: no images found")
        failures = None if batch.to_stdout else FailureLog(Path(batch.output), writable=not batch.dry_run)
        plan = plan_jobs(discovery, batch, name_fields, failures, output_size)
        if plan.collisions and not batch.dry_run:
            raise _collisions(plan.collisions, "nothing done")
        summary = run_jobs(
            plan,
            lambda: prepare(reporter),
            reporter,
            batch,
            seed=seed,
            failures=failures,
            summary=summary,
            prepass=prepass,
        )
    if plan.collisions:  # a dry run lists them all first
        raise _collisions(plan.collisions, "a run would refuse to start")
    if summary.exit_code:
        raise typer.Exit(summary.exit_code)


def _check_output_folder(folder: Path) -> None:
    """Before any work, and without making anything: an -o that cannot be written fails now, not
    image by image after the model has loaded."""
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p.is_symlink())
    where = "" if existing == folder else f" ({existing} is in its path)"
    if not existing.is_dir():
        raise UsageError(f"-o {folder}: not a folder{where}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"-o {folder}: not writable{where}")


def _collisions(collisions: list[str], consequence: str) -> UsageError:
    return UsageError(
        f"{len(collisions)} output name collision(s), {consequence}: {collisions[0]}",
        hint='make names unique, e.g. --name "{stem}_{ext}"',
    )
