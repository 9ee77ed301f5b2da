"""`pasd upscale`: PASD real-world super-resolution over a batch of images."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..batch.command import Progress
from ..batch.plan import Job
from ..batch.prompt_pass import PromptChoice
from ..batch.report import Reporter
from ..batch.settings import BatchSettings
from ..engine.settings import UpscaleSettings
from ..store import PASD_MODEL, Resolution
from .diffusion import DiffusionCommand, run
from .option_groups import with_options
from .options import BATCH_OPTIONS, PROMPT_OPTIONS, ModelChoice, diffusion_options, model_options
from .runtime import Runtime

if TYPE_CHECKING:
    from PIL import Image

    from ..engine.pipeline import PASDPipeline


# The JSON record's field for a black-and-white input, and the -v line said once per run.
COLORIZE_HINT = "looks black and white: pasd colorize can colour it"


class UpscaleCommand(DiffusionCommand):
    name = "upscale"
    told_colorize = False

    def transform(self, rgb: Image.Image, job: Job, progress: Progress) -> tuple[Image.Image, dict[str, Any]]:
        from ..engine.grayscale import is_grayscale

        if is_grayscale(rgb):  # only the record and -v: the output's metadata stays as it was
            job.extra.update(grayscale=True, hint=COLORIZE_HINT)
            if not self.told_colorize and self._reporter is not None:
                self._reporter.debug(f"{job.source} {COLORIZE_HINT}")
                self.told_colorize = True
        return super().transform(rgb, job, progress)

    def load_pipeline(
        self, models: Resolution, runtime: Runtime, reporter: Reporter
    ) -> tuple[PASDPipeline, dict[str, Any]]:
        from ..engine import load_pipeline

        pipeline = load_pipeline(models.path(self.pasd_ref), models.path(self.base_ref), runtime.device, runtime.dtype)
        return pipeline, {}


@with_options(
    batch=BATCH_OPTIONS,
    models=model_options(PASD_MODEL),
    settings=diffusion_options(UpscaleSettings()),
    prompts=PROMPT_OPTIONS,
)
def upscale(batch: BatchSettings, models: ModelChoice, settings: UpscaleSettings, prompts: PromptChoice) -> None:
    """Upscale images (PASD real-world super-resolution).

    Results are written atomically to -o; existing outputs are skipped, so a re-run only does what is left.
    """
    run(UpscaleCommand(settings, models, prompts, batch), batch)
