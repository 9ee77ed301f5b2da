"""Loading the colorization model: a PASD checkpoint (the light variant as released) with its
own scheduler folder beside the checkpoint folder, `<model>/checkpoint-N/` and `<model>/scheduler/`.

The released code always builds `UniPCMultistepScheduler.from_pretrained(<parent>, subfolder=
"scheduler")`, where the parent comes from splitting the checkpoint path string on "/", so a
trailing slash makes it look inside the checkpoint folder. We take the parent of the normalised
path, read whatever config the folder holds (the authors only say it was "updated to ensure
zero-terminal SNR"; no value is assumed here), and build UniPC from it whatever class it names,
as released. The base model's scheduler is not used in this mode.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import ModelError
from ..nn.converted_weights import ConvertedWeights
from ..nn.loading import read_json_config
from .loading import Components, load_components

SCHEDULER_FOLDER = "scheduler"
SCHEDULER_CONFIG = "scheduler_config.json"


def colorize_scheduler_dir(pasd_dir: Path | str) -> Path:
    """`<model>/scheduler` for the checkpoint folder `<model>/checkpoint-N`, with or without a
    trailing separator."""
    return Path(os.path.abspath(pasd_dir)).parent / SCHEDULER_FOLDER


def read_scheduler_config(scheduler_dir: Path) -> dict:
    scheduler_dir = Path(scheduler_dir)
    if not scheduler_dir.is_dir():
        raise ModelError(
            f"colorization scheduler folder not found: {scheduler_dir} (it belongs beside the checkpoint folder)"
        )
    return read_json_config(scheduler_dir / SCHEDULER_CONFIG, "scheduler config")


def load_colorize_components(
    pasd_dir: Path | str,
    base_dir: Path | str,
    scheduler_dir: Path | str | None = None,
    dtype: torch.dtype = torch.float32,
    keep_half_weights: bool = False,
    converted: ConvertedWeights | str | Path | None = None,
) -> Components:
    """The checkpoint, the base's VAE, text encoder and tokenizer, and the scheduler config from
    `scheduler_dir` (default: beside the checkpoint). The scheduler is checked first, before
    the networks are read."""
    scheduler_dir = Path(scheduler_dir) if scheduler_dir is not None else colorize_scheduler_dir(pasd_dir)
    config = read_scheduler_config(scheduler_dir)
    components = load_components(Path(pasd_dir), Path(base_dir), dtype, keep_half_weights, converted=converted)
    components.scheduler_config = config  # built as UniPC, the pipeline's default class
    return components


def load_colorizer(
    pasd_dir: Path | str,
    base_dir: Path | str,
    device: torch.device,
    dtype: torch.dtype,
    memory_budget: int | None = None,
    scheduler_dir: Path | str | None = None,
    keep_half_weights: bool = False,
    converted: ConvertedWeights | str | Path | None = None,
):
    """A `PASDPipeline` ready for `colorize`."""
    from .pipeline import PASDPipeline

    components = load_colorize_components(pasd_dir, base_dir, scheduler_dir, dtype, keep_half_weights, converted)
    return PASDPipeline(components, device, dtype, memory_budget)
