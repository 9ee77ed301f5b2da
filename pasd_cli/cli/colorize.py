"""`pasd colorize`: PASD-light's colorization of black-and-white photos (spec section 7) over a
batch: a grey photo in, a colour photo out at the same size, whose luma is the input's.

The engine does the released path (engine/colorize.py); what the command adds:
- colour inputs are refused (a failed record, remembered by the failure memory) unless --force:
  the model sees only the luma, so a colour photo would lose its own colours. Whether an input is
  black and white is known only once it is decoded, so a dry run plans colour inputs too;
- a 16-bit grey input keeps its 16-bit luma in a 16-bit RGB output (with --luma exact);
- the output is colour whatever the input's kind (gray in, RGB out); alpha and metadata are kept.
Nothing here imports torch before the pipeline loads.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..batch.command import Pending, Progress
from ..batch.plan import Job, Size
from ..batch.prompt_pass import PromptChoice
from ..batch.report import Reporter
from ..batch.settings import BatchSettings
from ..engine.settings import CAPTION_SEPARATOR, ColorizeSettings
from ..errors import InputError, ModelError
from ..store import COLORIZE_PASD, Resolution
from .diffusion import DiffusionCommand, out_of_memory_fails_batch, run
from .option_groups import with_options
from .options import (
    BATCH_OPTIONS,
    COLORIZE_OPTIONS,
    PROMPT_OPTIONS,
    ModelChoice,
    colorize_settings_options,
    model_options,
)
from .runtime import Runtime, dtype_name

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from .. import imageio
    from ..engine.colorize import ColorizeResult
    from ..engine.pipeline import PASDPipeline

# How a refused colour input's reason starts: the failure memory keeps it, and --force retries it.
COLOUR_REFUSED = "looks like a colour picture"


def colorize_prompt_rule(
    user_prompt: str,
    added_prompt: str,
    caption: str | None = None,
    label: str | None = None,
    separator: str = CAPTION_SEPARATOR,
) -> str:
    from ..engine.colorize import colorize_prompt

    return colorize_prompt(user_prompt, added_prompt, caption=caption, label=label, separator=separator)


class ColorizeCommand(DiffusionCommand):
    name = "colorize"
    prompt_rule = staticmethod(colorize_prompt_rule)

    def __init__(
        self, settings: ColorizeSettings, models: ModelChoice, prompts: PromptChoice, batch: BatchSettings, force: bool
    ):
        super().__init__(settings, models, prompts, batch)
        self.colorize_settings = settings
        self.force = force

    def planned_working_size(self, size: Size) -> Size:
        from ..engine.resize import colorize_working_size  # no torch: sizes from headers alone

        return colorize_working_size(size, self.colorize_settings.process_size)

    def retries(self, reason: str) -> bool:
        return self.force and reason.startswith(COLOUR_REFUSED)

    def resolve(self, reporter: Reporter, dry_run: bool) -> None:
        super().resolve(reporter, dry_run)
        if dry_run:
            return
        assert self.resolution is not None
        from ..engine.colorize_loading import colorize_scheduler_dir, read_scheduler_config

        try:  # before the captioner runs: a realisr checkpoint has no scheduler beside it
            read_scheduler_config(colorize_scheduler_dir(self.resolution.path(self.pasd_ref)))
        except ModelError as exc:
            raise ModelError(
                str(exc),
                hint="--pasd names the colorization checkpoint folder (checkpoint-N), with scheduler/ beside it",
            ) from None

    def prepass(self, pending: Pending) -> None:
        super().prepass(pending)
        if pending.dry_run and pending.jobs and not self.force:
            pending.reporter.info(
                "dry run: inputs are not decoded, so colour ones are planned too; a run refuses them (see --force)"
            )

    def load_pipeline(
        self, models: Resolution, runtime: Runtime, reporter: Reporter
    ) -> tuple[PASDPipeline, dict[str, Any]]:
        from ..engine import load_colorize_pipeline
        from ..engine.colorize_loading import colorize_scheduler_dir

        pasd = models.path(self.pasd_ref)
        pipeline = load_colorize_pipeline(
            pasd,
            models.path(self.base_ref),
            runtime.device,
            runtime.dtype,
            keep_half_weights=runtime.half_weights,
            converted=runtime.converted,
        )
        return pipeline, {"scheduler": str(colorize_scheduler_dir(pasd))}

    # -- one image
    def transform(self, rgb: Image.Image, job: Job, progress: Progress) -> tuple[Image.Image, dict[str, Any]]:
        """8-bit in, 8-bit RGB out: the picture's luma coloured."""
        result, extra = self._colorize(rgb, None, job, progress)
        return result.image, extra

    def develop(
        self, loaded: imageio.LoadedImage, job: Job, progress: Progress
    ) -> tuple[Image.Image | imageio.RGB16, dict[str, Any]]:
        """Refuse a colour input (unless --force), colour the luma (at 16 bits when the input has
        them and the merge keeps them), and write colour whatever the input's kind."""
        from .. import imageio

        black_and_white = self._check_black_and_white(loaded, job)
        luma16 = self._luma16(loaded)
        if loaded.pixels16 is not None and luma16 is None:
            loaded.notes.append("16-bit input written at 8 bits: --luma released merges 8-bit lumas")
        result, extra = self._colorize(loaded.rgb, luma16, job, progress)
        _drop_gray_profile(loaded)
        coloured = replace(loaded, gray=False, pixels16=result.pixels16)
        return imageio.restore(result.image, coloured), {**extra, "grayscale": black_and_white}

    def _check_black_and_white(self, loaded: imageio.LoadedImage, job: Job) -> bool:
        from ..engine.grayscale import is_grayscale

        if loaded.gray or is_grayscale(loaded.pixels16 if loaded.pixels16 is not None else loaded.rgb):
            return True
        if self.force:
            return False
        raise InputError(
            f"{job.source}: {COLOUR_REFUSED}, not black and white: colorizing would replace its colours "
            "(--force colorizes it anyway)"
        )

    def _luma16(self, loaded: imageio.LoadedImage) -> np.ndarray | None:
        """The input's 16-bit luma, kept by the exact merge; None for 8-bit inputs."""
        pixels = loaded.pixels16
        if pixels is None or self.colorize_settings.luma != "exact":
            return None
        if pixels.ndim == 2:
            return pixels
        import numpy as np

        from ..engine.yuv import LUMA_WEIGHTS  # the luma the exact merge keeps

        luma: np.ndarray = np.clip(np.round(pixels @ LUMA_WEIGHTS), 0, 65535).astype(np.uint16)
        return luma

    def _colorize(
        self, rgb: Image.Image, luma16: np.ndarray | None, job: Job, progress: Progress
    ) -> tuple[ColorizeResult, dict[str, Any]]:
        from ..engine import colorize

        assert self.pipeline is not None  # loaded by the runner before the first job
        chosen = self.prompts.for_job(job)
        warn = self._reporter.warn if self._reporter is not None else None
        with out_of_memory_fails_batch(self.pipeline, job, "colorizing"):
            result = colorize(
                self.pipeline,
                rgb,
                self.colorize_settings,
                luma16=luma16,
                progress=progress,
                on_warning=warn,
                **chosen.pipeline_args(),
            )
        extra: dict[str, Any] = {
            "prompt": result.prompt,
            **chosen.provenance(),
            "luma_shift": result.luma_shift,
            "latent_tiles": result.latent_tiles,
            "tile_batch": result.tile_batch,
            "vae_tile": result.vae_tile,
            **self.attention_window(result.vae_attention_window),
        }
        if self.pipeline.dtype != self.runtime().dtype:  # after an overflow
            extra["dtype"] = dtype_name(self.pipeline.dtype)
        return result, extra


def _drop_gray_profile(loaded: imageio.LoadedImage) -> None:
    """A grey input's ICC profile cannot describe RGB pixels: the output goes without one."""
    if not loaded.icc:
        return
    import io

    from PIL import ImageCms

    try:
        space = ImageCms.ImageCmsProfile(io.BytesIO(loaded.icc)).profile.xcolor_space.strip()
    except (ImageCms.PyCMSError, OSError, ValueError):
        space = "unreadable"
    if space != "RGB":
        loaded.icc = None
        loaded.notes.append(f"{space} ICC profile dropped (the output is RGB)")


@with_options(
    batch=BATCH_OPTIONS,
    models=model_options(COLORIZE_PASD),
    settings=colorize_settings_options(),
    prompts=PROMPT_OPTIONS,
    force=COLORIZE_OPTIONS,
)
def colorize(
    batch: BatchSettings, models: ModelChoice, settings: ColorizeSettings, prompts: PromptChoice, force: bool
) -> None:
    """Colorize black-and-white photos (PASD-light trained on grayscale, as released).

    Each output is the input's size with the input's luma (exactly, by default) and new colours.
    Colour inputs are refused unless --force.
    """
    run(ColorizeCommand(settings, models, prompts, batch, force), batch)
