"""What `upscale`, `stylize` and `colorize` share as command objects for the batch runner: the
models they resolve (once), the prompt pre-pass, where the model runs, the per-image call into
the engine and the record every output carries. Each command adds how its pipeline loads."""

from __future__ import annotations

import os
from abc import abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, ClassVar

from ..batch.command import ImageCommand, Pending, Progress
from ..batch.plan import Job, Size
from ..batch.prompt_pass import ImagePrompts, PromptChoice
from ..batch.records import JobResult
from ..batch.report import Reporter
from ..batch.settings import BatchSettings
from ..engine.settings import UpscaleSettings
from ..errors import DeviceError
from ..store import Kind, ModelRef, Resolution, offline_requested, resolve, runs_at_terminal, store_root
from .options import ModelChoice
from .runtime import Runtime, dtype_name, pick_runtime

if TYPE_CHECKING:
    from PIL import Image

    from ..engine.pipeline import PASDPipeline, UpscaleResult


def number_field(value: float) -> str:
    """4.0 -> "4", 2.5 -> "2.5": how a number reads in a file name."""
    return f"{value:g}"


class DiffusionCommand(ImageCommand):
    """A PASD command: resolve its models, describe its images, load its pipeline, run each image
    through it. Subclasses name themselves and load their pipeline (`load_pipeline`)."""

    name: ClassVar[str]

    def __init__(self, settings: UpscaleSettings, models: ModelChoice, prompts: PromptChoice, batch: BatchSettings):
        super().__init__(batch)
        self.settings, self.models = settings, models
        self.prompts = ImagePrompts(prompts, settings, batch.dry_run, batch.json, rule=self.prompt_rule)
        self.pasd_ref = ModelRef(models.pasd, Kind.PASD, "--pasd")
        self.base_ref = ModelRef(models.base, Kind.BASE, "--base")
        self.resolution: Resolution | None = None
        self._runtime: Runtime | None = None
        self.pipeline: PASDPipeline | None = None
        self._identity: dict[str, Any] = {}
        self._reporter: Reporter | None = None

    @staticmethod
    def prompt_rule(user_prompt: str, added_prompt: str, caption: str | None = None, label: str | None = None) -> str:
        """The positive prompt the engine builds from the settings and an image's description."""
        from ..engine.prompts import build_prompt

        return build_prompt(user_prompt, added_prompt, caption=caption, label=label)

    # -- what the runner asks before running
    @property
    def seed(self) -> int:
        return self.settings.seed

    def name_fields(self) -> dict[str, str]:
        s = self.settings
        return {"scale": number_field(s.scale), "seed": str(s.seed), "steps": str(s.steps)}

    def planned_size(self, size: Size) -> Size:
        from ..engine.resize import output_size  # no torch: sizes from headers alone

        return output_size(size, self.settings.scale)

    def planned_working_size(self, size: Size) -> Size:
        from ..engine.resize import working_size

        return working_size(size, self.settings.scale, self.settings.process_size)

    # -- the lifecycle
    def model_refs(self) -> list[ModelRef]:
        """Every model the pipeline loads."""
        return [self.pasd_ref, self.base_ref]

    def resolve(self, reporter: Reporter, dry_run: bool) -> None:
        if offline_requested(self.models.offline):
            os.environ["HF_HUB_OFFLINE"] = "1"  # for every library loaded below, not just our store
        refs = [] if dry_run else self.model_refs()
        self.resolution = resolve(
            [*refs, *self.prompts.refs()],
            models_dir=self.models.models_dir,
            offline=self.models.offline,
            interactive=runs_at_terminal(),
            say=reporter.info,
        )

    def prepass(self, pending: Pending) -> None:
        assert self.resolution is not None  # resolved first, by the runner
        self.prompts.prepass(pending, self.resolution, self.runtime, store_root(self.models.models_dir))

    def runtime(self) -> Runtime:
        """The device and dtype (--device, --dtype), chosen once."""
        if self._runtime is None:
            self._runtime = pick_runtime(self.models.device, self.models.dtype, self.models.local_rank)
        return self._runtime

    def meeting_device(self) -> Any:
        if self.batch.dry_run:
            return None
        device = self.runtime().device
        return device if device.type == "cuda" else None

    def load(self, reporter: Reporter) -> None:
        from .faults import reach
        from .runtime import memory_budget

        reach("load")
        assert self.resolution is not None
        runtime = self.runtime()
        quiet_libraries()
        pasd_dir = self.resolution.path(self.pasd_ref)
        reporter.info(f"loading PASD from {pasd_dir} on {runtime.label}")
        pipeline, identity = self.load_pipeline(self.resolution, runtime, reporter)
        mb = self.models.vae_memory_mb  # measured with the models in place
        pipeline.memory_budget = mb * 2**20 if mb else memory_budget(runtime.device)
        self.pipeline, self._reporter = pipeline, reporter
        self._identity = {
            "pasd": str(pasd_dir),
            "base": str(self.resolution.path(self.base_ref)),
            "variant": pipeline.unet.paca_variant,
            "rrdb_blocks": pipeline.controlnet.rrdb_blocks,
            "device": str(runtime.device),
            "dtype": runtime.dtype_name,
            **identity,
        }

    @abstractmethod
    def load_pipeline(
        self, models: Resolution, runtime: Runtime, reporter: Reporter
    ) -> tuple[PASDPipeline, dict[str, Any]]:
        """The command's pipeline on `runtime`, and what the outputs record about its models
        beyond PASD and SD 1.5."""

    def work(self, job: Job, progress: Progress) -> JobResult:
        from .faults import watch

        return super().work(job, watch(progress))

    def transform(self, rgb: Image.Image, job: Job, progress: Progress) -> tuple[Image.Image, dict[str, Any]]:
        assert self.pipeline is not None  # loaded by the runner before the first job
        chosen = self.prompts.for_job(job)
        warn = self._reporter.warn if self._reporter is not None else None
        result = upscale_image(self.pipeline, rgb, self.settings, job, progress, warn, chosen.pipeline_args())
        # The JSON record also gets `chosen.to_json()`, from the pre-pass.
        tiles: dict[str, Any] = {"latent_tiles": result.latent_tiles, "vae_tile": result.vae_tile}
        if result.dtype is not None and result.dtype != self.runtime().dtype:  # after an overflow
            tiles["dtype"] = dtype_name(result.dtype)
        return result.image, {"prompt": result.prompt, **chosen.provenance(), **tiles}

    def record(self) -> dict[str, Any]:
        return {"command": self.name, "settings": asdict(self.settings), "model": self._identity}


def upscale_image(
    pipeline: PASDPipeline,
    rgb: Image.Image,
    settings: UpscaleSettings,
    job: Job,
    progress: Progress | None = None,
    warn: Callable[[str], None] | None = None,
    prompt: dict[str, str | None] | None = None,
) -> UpscaleResult:
    """One image through the engine; running out of memory fails the batch (exit 4) with the
    image named. `prompt`: the image's high-level information (`ImagePrompt.pipeline_args`)."""
    from ..engine import upscale

    with out_of_memory_fails_batch(pipeline, job, "upscaling"):
        return upscale(pipeline, rgb, settings, progress=progress, on_warning=warn, **(prompt or {}))


@contextmanager
def out_of_memory_fails_batch(pipeline: PASDPipeline, job: Job, doing: str) -> Iterator[None]:
    """Running out of memory on an image (after the engine's own retries) is a DeviceError that
    names the image: the next images would run out too."""
    from ..engine.memory import is_out_of_memory

    try:
        yield
    except RuntimeError as exc:  # torch.OutOfMemoryError is one
        if not is_out_of_memory(exc):
            raise
        raise DeviceError(
            f"out of memory on {pipeline.device} {doing} {job.source}",
            hint="use a smaller --latent-tile or --process-size",
        ) from None


def quiet_libraries() -> None:
    """Library logs and progress bars would drown our own stderr lines."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def run(command: DiffusionCommand, batch: BatchSettings) -> None:
    """Run the command over the batch; exit code 1 when some input failed."""
    import typer

    from ..batch.runner import run_batch

    summary = run_batch(command, batch)
    if summary.exit_code:
        raise typer.Exit(summary.exit_code)
