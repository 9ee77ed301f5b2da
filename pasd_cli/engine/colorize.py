"""Colorization of black-and-white photos (spec section 7; reference README, "Colorization
reference"): the released path, and a merge that keeps the input's luma.

The released path (test_pasd.py, control type "grayscale"): the input goes to luma and back to
RGB; in the prompt "black and white" becomes "color", nothing is added to it, and the negative
prompt is fixed; no enlargement; the process-size resize is always applied, capped at twice the
process size, then the sides are cut to multiples of 8; the shared PASD pipeline runs with the
colorization checkpoint and its own scheduler (engine/colorize_loading.py); there is no colour
fix; the result is resized bilinearly back to the input size (OpenCV arithmetic) and merged in
YUV, luma from the input and chroma from the result (engine/yuv.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from ..errors import InputError
from .linear_resize import resize_linear
from .prompts import build_prompt
from .resize import colorize_size
from .settings import CAPTION_SEPARATOR, COLOR_NEGATIVE_PROMPT, LUMA_MODES, ColorizeSettings
from .yuv import exact_merge, max_luma_shift, released_merge

if TYPE_CHECKING:
    from .memory import Warn
    from .pipeline import PASDPipeline, Progress, Trace

# Replaced exactly and case-sensitively, in the whole prompt (caption included), as released.
_MONOCHROME_WORDS, _COLOR_WORD = "black and white", "color"
MAX16 = 65535
__all__ = ["COLOR_NEGATIVE_PROMPT", "LUMA_MODES", "ColorizeResult", "ColorizeSettings", "colorize", "colorize_prompt"]


@dataclass
class ColorizeResult:
    image: Image.Image  # 8-bit RGB at the input's size
    prompt: str  # the positive prompt used
    hint_size: tuple[int, int]  # the model's working size
    # uint16 (H, W, 3) RGB when a 16-bit luma was given: that luma with the result's chroma.
    pixels16: np.ndarray | None = None
    # Largest distance, in 8-bit levels, between the output's luma and the input's: at most 1
    # with the exact merge, up to tens of levels with the released one.
    luma_shift: int = 0
    latent_tiles: int = 1
    tile_batch: int = 1
    vae_tile: int = 0
    vae_attention_window: int = 0


def colorize_prompt(
    user_prompt: str,
    added_prompt: str = "",
    caption: str | None = None,
    label: str | None = None,
    separator: str = CAPTION_SEPARATOR,
) -> str:
    """The realisr prompt rules (a caption or label takes its place as there), then every
    "black and white" becomes "color": a caption of a grey photo says "a black and white photo
    of ...", which would ask the model for grey."""
    prompt = build_prompt(user_prompt, added_prompt, caption=caption, label=label, separator=separator)
    return prompt.replace(_MONOCHROME_WORDS, _COLOR_WORD)


def colorize_hint(gray_rgb: Image.Image, process_size: int) -> Image.Image:
    """The model's input: resized by `colorize_size` (PIL BILINEAR, as torchvision does it on
    PIL images), then sides cut to multiples of 8 by a BICUBIC resize, as released."""
    size = colorize_size(gray_rgb.size, process_size)
    image = gray_rgb if size == gray_rgb.size else gray_rgb.resize(size, Image.Resampling.BILINEAR)
    width, height = image.size
    if width < 8 or height < 8:
        w, h = gray_rgb.size
        raise InputError(
            f"image of {w}x{h} px is too narrow to colorize: its short side would be {min(size)} px",
            hint="use a larger process size",
        )
    return image.resize((width // 8 * 8, height // 8 * 8), Image.Resampling.BICUBIC)


def _check_luma16(luma16: np.ndarray, size: tuple[int, int], settings: ColorizeSettings) -> None:
    width, height = size
    if luma16.dtype != np.uint16 or luma16.shape != (height, width):
        raise ValueError(f"16-bit luma must be uint16 of shape ({height}, {width}), got {luma16.dtype} {luma16.shape}")
    if settings.luma != "exact":
        raise ValueError("a 16-bit luma is kept only by the exact luma merge")


def colorize(
    pipeline: PASDPipeline,
    image: Image.Image,
    settings: ColorizeSettings,
    luma16: np.ndarray | None = None,
    caption: str | None = None,
    label: str | None = None,
    progress: Progress | None = None,
    trace: Trace | None = None,
    on_warning: Warn | None = None,
) -> ColorizeResult:
    """`image`: any PIL image; its luma is what gets coloured (a colour image loses its colours).
    `luma16`: the same picture's luma at 16 bits, (H, W) uint16, kept in `pixels16`.
    `caption` / `label`: high-level information for the prompt, as in `upscale`."""
    if not isinstance(settings, ColorizeSettings):
        raise TypeError("colorize takes ColorizeSettings")
    trace = trace or (lambda name, value: None)
    # 1. Grey input: Pillow's luma, then three equal channels, as released.
    gray = image.convert("RGB").convert("L")
    if luma16 is not None:
        _check_luma16(luma16, gray.size, settings)
    gray_rgb = gray.convert("RGB")
    gray_uint8 = np.asarray(gray)
    trace("gray_uint8", torch.from_numpy(gray_uint8.copy()).unsqueeze(0))

    # 2-5. Hint, prompt, the shared pipeline (no colour fix).
    hint = colorize_hint(gray_rgb, settings.process_size)
    prompt = colorize_prompt(
        settings.prompt, settings.added_prompt, caption=caption, label=label, separator=settings.caption_separator
    )
    generated = pipeline.generate(hint, prompt, settings, progress, trace, on_warning)

    # 6. Back to the input size, bilinear with OpenCV's arithmetic.
    color = resize_linear(generated.image.permute(1, 2, 0).numpy(), gray.size)
    trace("color_resized_uint8", torch.from_numpy(color).permute(2, 0, 1))

    # 7. Luma from the input, chroma from the result.
    pixels16 = None
    if settings.luma == "released":
        rgb = released_merge(gray_uint8, color)
    elif luma16 is None:
        rgb = exact_merge(gray_uint8, color)
    else:
        pixels16 = exact_merge(luma16, color, MAX16)
        rgb = np.round(pixels16 / 257).astype(np.uint8)
    trace("final_uint8", torch.from_numpy(rgb).permute(2, 0, 1))
    return ColorizeResult(
        image=Image.fromarray(rgb),
        prompt=prompt,
        hint_size=hint.size,
        pixels16=pixels16,
        luma_shift=max_luma_shift(rgb, gray_uint8),
        latent_tiles=generated.latent_tiles,
        tile_batch=generated.tile_batch,
        vae_tile=generated.vae_tile,
        vae_attention_window=generated.vae_attention_window,
    )
