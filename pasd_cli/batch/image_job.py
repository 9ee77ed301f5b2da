"""One image through a command, with everything around it: read, develop (by default: hand the
model 8-bit RGB, put alpha, gray and 16-bit back), write atomically with metadata."""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from typing import Any, BinaryIO

from PIL import Image

from .. import imageio
from ..atomic import write_atomic
from ..errors import DeviceError
from .plan import Job
from .records import JobResult

Progress = Callable[[str, int, int], None]
# The decoded input to the image to write, and extra fields (`ImageCommand.develop`).
Develop = Callable[[imageio.LoadedImage, Job, Progress], tuple[Image.Image | imageio.RGB16, dict[str, Any]]]


def process(job: Job, develop: Develop, record: dict[str, Any], quality: int | None, progress: Progress) -> JobResult:
    """`record` (command, settings, model identity) goes into the output's metadata, together
    with the extra fields of `develop`."""
    assert job.format is not None  # set by the plan for every job to do
    fmt = job.format
    loaded = imageio.load(job.source)
    image, extra = develop(loaded, job, progress)
    meta = {**record, **extra}
    if job.output is None:
        written = _to_stdout(image, fmt, loaded, meta, quality)
    else:
        holder: list[Image.Image | imageio.RGB16] = []

        def write(handle: BinaryIO) -> None:  # "write" 0/1: the temporary file is open; 1/1: it holds the bytes
            progress("write", 0, 1)
            holder.append(imageio.encode(image, handle, fmt, loaded, meta, quality))
            progress("write", 1, 1)

        write_atomic(job.output, write)
        written = holder[0]
    fields = {"mode": written.mode, "bits": imageio.bits(written), **extra}
    if loaded.notes:
        fields["notes"] = "; ".join(loaded.notes)
    return JobResult(written.size, fields)


def _to_stdout(
    image: Image.Image | imageio.RGB16, fmt: str, loaded: imageio.LoadedImage, meta: dict[str, Any], quality: int | None
) -> Image.Image | imageio.RGB16:
    buffer = io.BytesIO()
    written = imageio.encode(image, buffer, fmt, loaded, meta, quality)
    try:
        sys.stdout.buffer.write(buffer.getvalue())
        sys.stdout.buffer.flush()
    except OSError as exc:
        raise DeviceError(f"cannot write the image to stdout: {exc.strerror or exc}") from None
    return written
