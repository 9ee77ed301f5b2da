"""PASD as a library: load a pipeline from local folders, then upscale, stylize or colorize PIL
images with plain settings objects. The engine never prints, never reads the
environment and never picks a device: the caller passes a device, a dtype and, optionally, the
memory the VAE may use.

    import torch
    from PIL import Image

    from pasd_cli.engine import UpscaleSettings, load_pipeline, upscale

    pipeline = load_pipeline("PASD/pasd/checkpoint-100000", "stable-diffusion-v1-5", torch.device("cpu"))
    result = upscale(pipeline, Image.open("photo.jpg"), UpscaleSettings(scale=2, prompt="a harbour at dusk"))
    result.image.save("photo_x2.png")

The defaults choose tiling and the VAE's attention for speed. `exact_settings(settings)` with a
pipeline in `EXACT_DTYPE` (float32) computes what the released script computes.

Importing this package is cheap: the settings load at once, while the pipeline (torch,
diffusers) loads on first use of a name that needs it.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .settings import (
    ADDED_PROMPT,
    BASE_BLEND,
    BLENDS,
    CAPTION_MODES,
    COLOR_FIXES,
    COLOR_NEGATIVE_PROMPT,
    EXACT_DTYPE,
    FAST_GUIDANCE,
    FAST_STEPS,
    LUMA_MODES,
    NEGATIVE_PROMPT,
    CaptionSettings,
    ColorizeSettings,
    LoraSpec,
    StylizeSettings,
    UpscaleSettings,
    exact_settings,
)

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

    from ..nn.converted_weights import ConvertedWeights
    from .captions import DescriberSpec, Description
    from .colorize import ColorizeResult
    from .pipeline import PASDPipeline, Progress, UpscaleResult
    from .stylize import PersonalizeReport, StageCallback

__all__ = [
    "ADDED_PROMPT",
    "BASE_BLEND",
    "BLENDS",
    "CAPTION_MODES",
    "COLOR_FIXES",
    "COLOR_NEGATIVE_PROMPT",
    "EXACT_DTYPE",
    "FAST_GUIDANCE",
    "FAST_STEPS",
    "LUMA_MODES",
    "NEGATIVE_PROMPT",
    "CaptionSettings",
    "ColorizeResult",
    "ColorizeSettings",
    "ConvertedWeights",
    "DescriberSpec",
    "Description",
    "LoraSpec",
    "PASDPipeline",
    "PersonalizeReport",
    "Progress",
    "StylizeSettings",
    "UpscaleResult",
    "UpscaleSettings",
    "colorize",
    "exact_settings",
    "load_colorize_pipeline",
    "load_pipeline",
    "load_stylize_pipeline",
    "stylize",
    "upscale",
]

# Names that need torch, and the module that holds each: imported on first use.
_LAZY = {
    "PASDPipeline": "pipeline",
    "UpscaleResult": "pipeline",
    "Progress": "pipeline",
    "PersonalizeReport": "stylize",
    "DescriberSpec": "captions",
    "Description": "captions",
    "ColorizeResult": "colorize",
    "ConvertedWeights": "loading",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def load_pipeline(
    pasd: str | Path,
    base: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    memory_budget: int | None = None,
    *,
    lcm_lora: str | Path | None = None,
    trust_pickle: bool = False,
    keep_half_weights: bool = False,
    converted: ConvertedWeights | str | Path | None = None,
    bf16_vae: bool = False,
) -> PASDPipeline:
    """The Real-ISR pipeline from a PASD checkpoint folder (with unet/ and controlnet/) and a
    Stable Diffusion 1.5 folder in diffusers layout, on `device` in `dtype` (default float32).
    `memory_budget`: bytes the VAE may use, which decides its automatic tiling (None: untiled).
    `lcm_lora`: the fast mode, as `load_stylize_pipeline` has it (the LCM-LoRA fused into the
    UNet, the LCM scheduler; run it with `FAST_STEPS` and `FAST_GUIDANCE`). The weights are read
    straight into `dtype`; the LoRA is merged in float32 layer by layer. `keep_half_weights`
    (float32 only): weights stored in float16 or bfloat16 stay so and are widened as each layer
    runs: the same output, half the weights' memory (engine/half_weights.py). `converted`: a
    folder where the networks' weights, cast into a half `dtype` at the first load, are kept
    converted for the next loads to map instead (the same output), or ConvertedWeights that
    may write them in the background (nn/converted_weights.py). `bf16_vae`: with a bfloat16
    `dtype`, the VAE runs in bfloat16 too instead of float32, as the command line's --fast has it:
    half the VAE's time on a CPU with bfloat16 instructions, a level or so from float32."""
    import torch

    from .loading import converted_weights, keep_merged_unet, load_components
    from .pipeline import PASDPipeline
    from .stylize import LCM_WEIGHT, use_lcm

    dtype = dtype or torch.float32
    copies = converted_weights(converted)
    lcm = ((Path(lcm_lora), LCM_WEIGHT),) if lcm_lora is not None else ()
    components = load_components(
        Path(pasd),
        Path(base),
        dtype,
        keep_half_weights,
        merges=bool(lcm),
        converted=copies,
        unet_merges=lcm,
        bf16_vae=bf16_vae,
    )
    if lcm_lora is not None:
        if copies is not None:
            copies.wait()  # the merge changes weights that a background copy may still be writing
        use_lcm(components, Path(lcm_lora), trust_pickle)
        keep_merged_unet(components, Path(pasd), copies, lcm)
    return PASDPipeline(components, torch.device(device), dtype, memory_budget)


def load_stylize_pipeline(
    pasd: str | Path,
    base: str | Path,
    style: str | Path | None = None,
    *,
    blend: float = BASE_BLEND,
    loras: Sequence[LoraSpec] = (),
    lcm_lora: str | Path | None = None,
    trust_pickle: bool = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    memory_budget: int | None = None,
    on_stage: StageCallback | None = None,
    keep_half_weights: bool = False,
    bf16_vae: bool = False,
) -> tuple[PASDPipeline, PersonalizeReport]:
    """The pipeline of `load_pipeline` put on a personalized SD 1.5 base (spec section 6): `style`
    (a single-file checkpoint, a diffusers folder or a UNet folder) blended at `blend` into the
    stock UNet, then `loras` merged in order, then the LCM-LoRA and its scheduler (`lcm_lora`).
    Merges happen on the CPU in float32, before the move to `device`. Pickled weights are read
    (with restricted unpickling) only with `trust_pickle`. `keep_half_weights` and `bf16_vae` as
    `load_pipeline` has them (what the merges change becomes float32, the rest stays as the files
    store it). Returns the pipeline and a report of what was applied."""
    import torch

    from .loading import load_components
    from .pipeline import PASDPipeline
    from .stylize import personalize

    components = load_components(
        Path(pasd), Path(base), keep_half_weights=keep_half_weights, merges=True, bf16_vae=bf16_vae
    )
    report = personalize(
        components,
        base=Path(style) if style is not None else None,
        blend=blend,
        loras=loras,
        lcm_lora=Path(lcm_lora) if lcm_lora is not None else None,
        trust_pickle=trust_pickle,
        on_stage=on_stage,
    )
    pipeline = PASDPipeline(components, torch.device(device), dtype or torch.float32, memory_budget)
    return pipeline, report


def upscale(
    pipeline: PASDPipeline,
    image: Image.Image,
    settings: UpscaleSettings | None = None,
    *,
    caption: str | None = None,
    label: str | None = None,
    progress: Progress | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> UpscaleResult:
    """Restore and enlarge one image (spec section 4). `caption` (a BLIP caption) or `label` (a
    class name or the user's own description) is the image's high-level information, combined
    with the settings' prompts as released. `progress(stage, done, total)` hears steps and tiles;
    `on_warning` hears that a tile was halved after running out of memory."""
    return pipeline.upscale(
        image.convert("RGB"),
        settings or UpscaleSettings(),
        caption=caption,
        label=label,
        progress=progress,
        on_warning=on_warning,
    )


def stylize(
    pipeline: PASDPipeline,
    image: Image.Image,
    settings: StylizeSettings | None = None,
    *,
    caption: str | None = None,
    label: str | None = None,
    progress: Progress | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> UpscaleResult:
    """Redraw one image in the style of the pipeline's personalized base (a pipeline from
    `load_stylize_pipeline`); the authors' defaults: conditioning scale 0.7, no enlargement."""
    return upscale(
        pipeline,
        image,
        settings or StylizeSettings(),
        caption=caption,
        label=label,
        progress=progress,
        on_warning=on_warning,
    )


def load_colorize_pipeline(
    pasd: str | Path,
    base: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    memory_budget: int | None = None,
    scheduler: str | Path | None = None,
    keep_half_weights: bool = False,
    converted: ConvertedWeights | str | Path | None = None,
) -> PASDPipeline:
    """The pipeline of a PASD-light colorization checkpoint folder, with the scheduler config of
    the `scheduler/` folder beside it (or `scheduler`), on `device` in `dtype` (default float32).
    `keep_half_weights` and `converted` as `load_pipeline` has them."""
    import torch

    from .colorize_loading import load_colorizer

    return load_colorizer(
        Path(pasd),
        Path(base),
        torch.device(device),
        dtype or torch.float32,
        memory_budget,
        scheduler,
        keep_half_weights=keep_half_weights,
        converted=converted,
    )


def colorize(
    pipeline: PASDPipeline,
    image: Image.Image,
    settings: ColorizeSettings | None = None,
    *,
    luma16: np.ndarray | None = None,
    caption: str | None = None,
    label: str | None = None,
    progress: Progress | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> ColorizeResult:
    """Colour one black-and-white image (a pipeline from `load_colorize_pipeline`); its luma is
    kept (`settings.luma`), at 16 bits when `luma16` gives it."""
    from .colorize import colorize as run

    return run(
        pipeline,
        image,
        settings or ColorizeSettings(),
        luma16=luma16,
        caption=caption,
        label=label,
        progress=progress,
        on_warning=on_warning,
    )


class _Engine(types.ModuleType):
    """`stylize` and `colorize` are also the names of modules of this package: importing one of
    them (Python then sets it as this package's attribute) must not replace the public function.
    The modules stay importable by their full names."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("stylize", "colorize") and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Engine
