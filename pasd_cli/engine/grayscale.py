"""Telling black-and-white pictures from colour ones, so that colorization can refuse colour
inputs (the model sees only the luma: a colour photo would lose its own colours).

A picture counts as black and white when its chroma is grey or a single tone, up to a
tolerance. Toned prints (sepia, selenium, cyanotype) and yellowed paper are monochrome: they
are what colorization is for. Chroma is measured as JPEG stores it (BT.601 Cb and Cr, in 8-bit
levels). Each pixel's chroma is split along the picture's mean tone into a part across that
tone and a part against it, and both must stay within the tolerance. So pixels may be toned
more or less strongly, but not in another hue. A small share of pixels (`outliers`, 1% by
default) may exceed it: JPEG ringing at edges, dust, a small coloured stamp.

The default tolerance of 8 levels passes a grey photo scanned in colour and saved as JPEG (its
chroma stays within 2-3 levels) and a toned print whose hue drifts a little with density. Colour
photos reach tens of levels in several hues. A colour photo of a single hue (a brown wooden
table) cannot be told from a toned print, and it counts as monochrome.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

DEFAULT_TOLERANCE = 8.0
DEFAULT_OUTLIERS = 0.01
# Enough pixels to decide; a regular subsample keeps small features (every k-th row and column).
_MAX_PIXELS = 1 << 20
_SINGLE_CHANNEL_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _rgb_levels(rgb_image: Image.Image | np.ndarray) -> np.ndarray | None:
    """(N, 3) float RGB in 8-bit levels, subsampled; None for a single-channel picture."""
    if isinstance(rgb_image, Image.Image):
        if rgb_image.mode in _SINGLE_CHANNEL_MODES:
            return None
        pixels = np.asarray(rgb_image.convert("RGB"))
    else:
        pixels = np.asarray(rgb_image)
        if pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[-1] in (1, 2)):
            return None
        if pixels.ndim != 3 or pixels.shape[-1] not in (3, 4):
            raise ValueError(f"expected an (H, W, 3) RGB array, got shape {pixels.shape}")
        if pixels.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"expected uint8 or uint16 pixels, got {pixels.dtype}")
    step = max(1, int(np.ceil(np.sqrt(pixels.shape[0] * pixels.shape[1] / _MAX_PIXELS))))
    sample = pixels[::step, ::step, :3].reshape(-1, 3).astype(np.float64)
    return sample / 257 if pixels.dtype == np.uint16 else sample


def is_grayscale(
    rgb_image: Image.Image | np.ndarray, tolerance: float = DEFAULT_TOLERANCE, outliers: float = DEFAULT_OUTLIERS
) -> bool:
    """True for grey or single-toned pictures (see the module's docstring). `rgb_image`: a PIL
    image of any mode, or an (H, W, 3) uint8/uint16 array; single-channel pictures are grey."""
    levels = _rgb_levels(rgb_image)
    if levels is None or len(levels) == 0:
        return True
    red, green, blue = levels.T
    y = 0.299 * red + 0.587 * green + 0.114 * blue
    cb, cr = 0.564 * (blue - y), 0.713 * (red - y)
    mean_cb, mean_cr = cb.mean(), cr.mean()
    norm = np.hypot(mean_cb, mean_cr)
    # With no mean tone (grey), any direction will do: both parts are then bounded by |chroma|.
    tone = (mean_cb / norm, mean_cr / norm) if norm > 0 else (1.0, 0.0)
    along = cb * tone[0] + cr * tone[1]
    across = np.abs(cr * tone[0] - cb * tone[1])
    off_tone = (across > tolerance) | (along < -tolerance)
    return bool(off_tone.mean() <= outliers)
