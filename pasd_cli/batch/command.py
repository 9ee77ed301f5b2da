"""What the batch runner drives: a command object. `upscale`, `stylize` (and later `colorize`) are
such objects; the runner owns their lifecycle, in distinct steps:

    plan the inputs (headers only)          runner.plan_batch
    resolve the command's models, once      Command.resolve      only when some input is left to do
    pre-pass over the jobs to do (prompts)  Command.prepass      before the model loads
    load the model, once                    Command.load         on the first job that needs it
    one job                                 Command.work         read, transform, write
    records and the summary                 runner, report
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from .plan import Job, Plan, Size
from .records import JobResult, Summary
from .report import Reporter
from .settings import BatchSettings

if TYPE_CHECKING:
    from PIL import Image

    from .. import imageio

# progress(stage, done, total): stage is "step", "tile", "caption", ..., as the engine reports it.
Progress = Callable[[str, int, int], None]


@dataclass
class Pending:
    """What a command's pre-pass sees before the per-job loop: the jobs still to do (in order),
    the whole plan, and the reporter and summary of the run. A pre-pass prepares what every job
    needs before the model loads (e.g. captions, so the captioner and the diffusion model are
    never in memory together); it may add record fields to `job.extra` and counters to
    `summary.extra`, and fail single jobs with `fail`."""

    jobs: list[Job]
    plan: Plan
    reporter: Reporter
    summary: Summary
    dry_run: bool
    _fail: Callable[[Job, InputError, bool], bool]

    def fail(self, job: Job, error: InputError, remember: bool = True) -> bool:
        """The job fails as if its work had raised `error`; `remember=False` keeps it out of the
        failure log (the error is not about the image's content, e.g. a bad sidecar file).
        Returns True when the batch stops there (--fail-fast): the pre-pass should stop too."""
        return self._fail(job, error, remember)


class Command(ABC):
    """One command as the batch runner sees it."""

    @property
    @abstractmethod
    def seed(self) -> int | None:
        """Recorded with every input."""

    @abstractmethod
    def name_fields(self) -> dict[str, str]:
        """Fields a --name template may use besides {stem} and {ext}, e.g. {"scale": "4"}."""

    def retries(self, reason: str) -> bool:
        """Whether this run tries again an input remembered as failed with `reason` (the failure
        memory skips it otherwise): one that an option now accepts, e.g. colorize's --force."""
        return False

    def fingerprint(self, job: Job) -> dict[str, Any] | None:
        """What decides the pixels of `job`'s output (settings, models, the image's description),
        recorded in the output so that a re-run can tell an output made with other settings
        (`staleness.py`). None: this command records none."""
        return None

    def planned_size(self, size: Size) -> Size | None:
        """The output size of an input of `size`, for the plan (None: unknown before running)."""
        return None

    def planned_working_size(self, size: Size) -> Size | None:
        """The size of the image the model works on for an input of `size`, for the plan and its
        pixel limit (None: no model, or unknown before running)."""
        return None

    def meeting_device(self) -> Any:
        """The CUDA device where this worker meets the others at the end (nccl), when its models
        run on CUDA; None: they meet on the CPU (gloo). The same on every worker of a run."""
        return None

    def resolve(self, reporter: Reporter, dry_run: bool) -> None:
        """Find, fetch or refuse every model the run needs: once, after planning, and only when
        some input is left to do. A dry run loads nothing: only what its pre-pass needs."""
        return None

    def prepass(self, pending: Pending) -> None:
        """Prepare every pending job before the model loads (dry runs included)."""
        return None

    @abstractmethod
    def load(self, reporter: Reporter) -> None:
        """Load the model: once, on the first job that needs it."""

    @abstractmethod
    def work(self, job: Job, progress: Progress) -> JobResult:
        """One job, from its input to its written output."""

    def close(self, reporter: Reporter) -> None:
        """After the last job of a run that loaded the model and was not stopped: finish what
        the model's loading left to do in the background."""
        return None


class ImageCommand(Command):
    """A command whose job is one image through a model: the batch reads the input, hands the
    command 8-bit RGB, puts alpha, gray and 16-bit back and writes the result with metadata.
    The command gives its `transform` and its `record`; one whose output is not of the input's
    kind (colorize: gray in, colour out) gives `develop` instead."""

    def __init__(self, batch: BatchSettings):
        self.batch = batch

    @abstractmethod
    def transform(self, rgb: Image.Image, job: Job, progress: Progress) -> tuple[Image.Image, dict[str, Any]]:
        """The 8-bit RGB result at the output size, and fields for the record and the metadata."""

    def develop(
        self, loaded: imageio.LoadedImage, job: Job, progress: Progress
    ) -> tuple[Image.Image | imageio.RGB16, dict[str, Any]]:
        """The decoded input to the image to write, and fields for the record and the metadata:
        `transform` of its 8-bit RGB, put back into the input's kind (gray, 16-bit, alpha). It
        may change what is written beside the pixels (`loaded`'s metadata and notes)."""
        from .. import imageio

        result, extra = self.transform(loaded.rgb, job, progress)
        return imageio.restore(result, loaded), extra

    @abstractmethod
    def record(self) -> dict[str, Any]:
        """What every output's metadata says about how it was made (command, settings, model)."""

    def work(self, job: Job, progress: Progress) -> JobResult:
        from .image_job import process

        record = self.record()
        fingerprint = self.fingerprint(job)
        if fingerprint is not None:
            record["fingerprint"] = fingerprint
        return process(job, self.develop, record, self.batch.quality, progress)
