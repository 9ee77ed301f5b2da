"""One image through a model, with everything around it: read, hand the model 8-bit RGB, put
alpha, gray and 16-bit back, write atomically with metadata. Shared by every image command; the
command supplies only its `Transform`."""

from __future__ import annotations

import io
import sys
from collections.abc import Callable

from PIL import Image

from ..atomic import write_atomic
from ..errors import DeviceError
from ..imageio import images as imageio
from .runner import Job, JobResult, Progress, Worker
from .settings import BatchSettings

# transform(rgb, job, progress) -> (8-bit RGB result at the output size, extra record fields).
Transform = Callable[[Image.Image, Job, Progress], tuple[Image.Image, dict]]


def image_worker(transform: Transform, record: dict, options: BatchSettings) -> Worker:
    """`record` (command, settings, model identity) goes into every output's metadata, together
    with the transform's extra fields."""

    def work(job: Job, progress: Progress) -> JobResult:
        loaded = imageio.load(job.source)
        result, extra = transform(loaded.rgb, job, progress)
        image = imageio.restore(result, loaded)
        meta = {**record, **extra}
        if job.output is None:
            written = _to_stdout(image, job.format, loaded, meta, options.quality)
        else:
            holder = []
            write_atomic(
                job.output,
                lambda handle: holder.append(imageio.encode(image, handle, job.format, loaded, meta, options.quality)),
            )
            written = holder[0]
        fields = {"mode": written.mode, "bits": imageio.bits(written), **extra}
        if loaded.notes:
            fields["notes"] = "; ".join(loaded.notes)
        return JobResult(written.size, fields)

    return work


def _to_stdout(image, fmt, loaded, meta, quality) -> Image.Image:
    buffer = io.BytesIO()
    written = imageio.encode(image, buffer, fmt, loaded, meta, quality)
    try:
        sys.stdout.buffer.write(buffer.getvalue())
        sys.stdout.buffer.flush()
    except OSError as exc:
        raise DeviceError(f"cannot write the image to stdout: {exc.strerror or exc}") from None
    return written
