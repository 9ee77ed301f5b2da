"""Telling black-and-white pictures from colour ones, so that colorization can refuse colour
inputs (the model sees only the luma: a colour photo would lose its own colours).

A picture counts as black and white when its chroma is a function of its luma, up to a
tolerance: grey (no chroma), or toned. Toned prints (sepia, selenium, cyanotype, split toning)
and yellowed paper are monochrome: the tone depends on the density alone, and they are what
colorization is for. In a colour photo, pixels of one brightness differ in colour.

How: the picture is averaged over blocks of at least 4x4 pixels, which cancels sensor noise and
the chroma blur of JPEG (4:2:0). Blocks across an edge are left out when enough others remain,
since their mean chroma mixes two tones. Chroma is measured as JPEG stores it (BT.601 Cb and
Cr, in 8-bit levels). The tone curve is the median chroma of the blocks of similar luma (within
20 levels); a block is off-tone when its chroma is farther from the curve than the tolerance. A
small share of off-tone blocks (`outliers`, 1% by default) is allowed: dust, a small coloured
stamp, a coloured line of handwriting.

The default tolerance of 6 levels passes a grey photo scanned in colour and saved as JPEG (its
block chroma stays within 1-2 levels) and a toned print. Colour photos differ by tens of
levels. Two limits, by design: a colour photo whose colour follows its brightness (a sunset
from dark red to yellow, a brown wooden table) counts as monochrome, and so does a grey picture
with a coloured patch smaller than the outlier share.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

DEFAULT_TOLERANCE = 6.0
DEFAULT_OUTLIERS = 0.01
_MIN_BLOCK = 4
# Enough blocks to decide; larger pictures get larger blocks.
_MAX_BLOCKS = 1 << 18
_LUMA_BINS = 64  # 4 levels each
_TONE_WINDOW = 5  # bins on each side: the tone at a luma is the median within +-20 levels
_FLAT_SPREAD = 8.0  # luma standard deviation within a block, in levels
_MIN_FLAT = 0.25  # share of flat blocks below which all blocks are judged
_LUMA = np.array([0.299, 0.587, 0.114])
_SINGLE_CHANNEL_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _pixels(rgb_image: Image.Image | np.ndarray) -> np.ndarray | None:
    """(H, W, 3) uint8 or uint16 RGB; None for a single-channel picture."""
    if isinstance(rgb_image, Image.Image):
        if rgb_image.mode in _SINGLE_CHANNEL_MODES:
            return None
        return np.asarray(rgb_image.convert("RGB"))
    pixels = np.asarray(rgb_image)
    if pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[-1] in (1, 2)):
        return None
    if pixels.ndim != 3 or pixels.shape[-1] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) RGB array, got shape {pixels.shape}")
    if pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"expected uint8 or uint16 pixels, got {pixels.dtype}")
    return pixels[..., :3]


def _blocks(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean RGB (N, 3) in 8-bit levels and luma spread (N,) of square blocks (edge remainders
    dropped, unless the picture is smaller than one block)."""
    height, width = pixels.shape[:2]
    block = max(_MIN_BLOCK, int(np.ceil(np.sqrt(height * width / _MAX_BLOCKS))))
    block = max(1, min(block, height, width))
    rows, cols = height // block, width // block
    rgb, y, y2 = np.zeros((rows, cols, 3)), np.zeros((rows, cols)), np.zeros((rows, cols))
    for dy in range(block):  # strided sums: no float copy of the whole picture
        for dx in range(block):
            part = pixels[dy : rows * block : block, dx : cols * block : block].astype(np.float64)
            luma = part @ _LUMA
            rgb += part
            y += luma
            y2 += luma * luma
    count, unit = block * block, (257 if pixels.dtype == np.uint16 else 1)
    spread = np.sqrt(np.maximum(y2 / count - (y / count) ** 2, 0)) / unit
    return rgb.reshape(-1, 3) / (count * unit), spread.reshape(-1)


def _distance_from_tone(levels: np.ndarray) -> np.ndarray:
    y = levels @ _LUMA
    cb, cr = 0.564 * (levels[:, 2] - y), 0.713 * (levels[:, 0] - y)
    bins = np.clip((y * _LUMA_BINS / 256).astype(int), 0, _LUMA_BINS - 1)
    tone = np.zeros((_LUMA_BINS, 2))
    for index in np.unique(bins):
        near = np.abs(bins - index) <= _TONE_WINDOW
        tone[index] = np.median(cb[near]), np.median(cr[near])
    return np.hypot(cb - tone[bins, 0], cr - tone[bins, 1])


def is_grayscale(
    rgb_image: Image.Image | np.ndarray, tolerance: float = DEFAULT_TOLERANCE, outliers: float = DEFAULT_OUTLIERS
) -> bool:
    """True for grey or toned pictures (see the module's docstring). `rgb_image`: a PIL image
    of any mode, or an (H, W, 3) uint8/uint16 array; single-channel pictures are grey."""
    pixels = _pixels(rgb_image)
    if pixels is None or pixels.size == 0:
        return True
    levels, spread = _blocks(pixels)
    # Across an edge a block's mean chroma mixes two tones, which a curved tone curve (or JPEG's
    # chroma blur) does not average to the tone of its mean luma.
    flat = spread <= _FLAT_SPREAD
    if flat.mean() >= _MIN_FLAT:
        levels = levels[flat]
    off_tone = _distance_from_tone(levels) > tolerance
    return bool(off_tone.mean() <= outliers)
