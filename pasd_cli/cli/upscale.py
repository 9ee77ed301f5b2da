"""`pasd upscale`: PASD real-world super-resolution over a batch of images."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

from ..batch.command import Progress
from ..batch.plan import Job
from ..batch.prompt_pass import PromptChoice
from ..batch.report import Reporter
from ..batch.settings import BatchSettings
from ..engine.settings import UpscaleSettings
from ..store import LCM_LORA, PASD_MODEL, Kind, ModelRef, Resolution
from .diffusion import DiffusionCommand, fast_settings, given_on_command_line, run
from .option_groups import with_options
from .options import BATCH_OPTIONS, FAST_OPTIONS, PROMPT_OPTIONS, ModelChoice, diffusion_options, model_options
from .runtime import Runtime

if TYPE_CHECKING:
    from PIL import Image

    from ..engine.pipeline import PASDPipeline


# The JSON record's field for a black-and-white input, and the -v line said once per run.
COLORIZE_HINT = "looks black and white: pasd colorize can colour it"


class UpscaleCommand(DiffusionCommand):
    name = "upscale"
    told_colorize = False

    def __init__(
        self,
        settings: UpscaleSettings,
        models: ModelChoice,
        prompts: PromptChoice,
        batch: BatchSettings,
        fast: bool = False,
    ):
        super().__init__(settings, models, prompts, batch)
        # --fast: the LCM-LoRA, fused into the UNet as `pasd stylize --fast` does.
        self.lcm_ref = ModelRef(LCM_LORA, Kind.LORA, "--fast") if fast else None

    def model_refs(self) -> list[ModelRef]:
        return [*super().model_refs(), *([self.lcm_ref] if self.lcm_ref is not None else [])]

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

        lcm_lora = models.path(self.lcm_ref) if self.lcm_ref is not None else None
        if lcm_lora is not None:
            reporter.info(f"applying lcm {lcm_lora}")
        pipeline = load_pipeline(
            models.path(self.pasd_ref),
            models.path(self.base_ref),
            runtime.device,
            runtime.dtype,
            lcm_lora=lcm_lora,
            keep_half_weights=runtime.half_weights,
            converted=runtime.converted,
            bf16_vae=lcm_lora is not None,
        )
        return pipeline, {"lcm_lora": str(lcm_lora)} if lcm_lora is not None else {}


@with_options(
    batch=BATCH_OPTIONS,
    models=model_options(PASD_MODEL),
    settings=diffusion_options(UpscaleSettings()),
    prompts=PROMPT_OPTIONS,
    fast=FAST_OPTIONS,
)
def upscale(
    ctx: typer.Context,
    batch: BatchSettings,
    models: ModelChoice,
    settings: UpscaleSettings,
    prompts: PromptChoice,
    fast: bool,
) -> None:
    """Upscale images (PASD real-world super-resolution).

    Results are written atomically to -o; existing outputs are skipped, so a re-run only does what is left.
    """
    if fast:
        settings = fast_settings(settings, given_on_command_line(ctx))
    run(UpscaleCommand(settings, models, prompts, batch, fast), batch)
