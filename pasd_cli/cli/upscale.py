"""`pasd upscale`'s part of a batch: the model call for one image."""

from __future__ import annotations

from dataclasses import asdict

import torch
from PIL import Image

from ..batch.image_job import Transform
from ..batch.runner import Job, Progress
from ..batch.settings import UpscaleSettings
from ..engine.memory import is_out_of_memory
from ..errors import DeviceError


def upscale_transform(pipeline, settings: UpscaleSettings, prompts=None, warn=None) -> Transform:
    """`prompts` (a `caption_cli.ImagePrompts`) gives each image's high-level information; without
    it every image gets the settings' prompt alone. `warn` hears that a tile was halved after an
    out-of-memory error."""

    def transform(rgb: Image.Image, job: Job, progress: Progress) -> tuple[Image.Image, dict]:
        chosen = prompts.for_job(job) if prompts is not None else None
        try:
            result = pipeline.upscale(
                rgb, settings, progress=progress, on_warning=warn, **(chosen.pipeline_args() if chosen else {})
            )
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc):
                raise
            raise DeviceError(
                f"out of memory on {pipeline.device} upscaling {job.source}",
                hint="use a smaller --latent-tile or --process-size",
            ) from None
        # The JSON record also gets `chosen.to_json()`, from the pre-pass (ImagePrompts).
        tiles = {"latent_tiles": result.latent_tiles, "vae_tile": result.vae_tile}
        return result.image, {"prompt": result.prompt, **(chosen.provenance() if chosen else {}), **tiles}

    return transform


def upscale_record(settings: UpscaleSettings, model: dict) -> dict:
    """What every output's metadata says about how it was made."""
    return {"command": "upscale", "settings": asdict(settings), "model": model}
