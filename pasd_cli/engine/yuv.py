"""Luma/chroma arithmetic of the colorization merge: luma from the grey input, chroma from the
model's colour result.

`released_merge` is OpenCV's 8-bit BGR<->YUV pair as the released script applies it (reference
README, "Colorization reference", step 9): 14-bit fixed point, round half up, every channel
saturated to [0, 255] both ways (the forward V of a saturated red is 285 before saturation).
Saturation moves the luma of out-of-gamut colours, by tens of levels.

`exact_merge` keeps the input's luma instead: each pixel is the grey level plus the result's
chroma offset (its colour minus its own luma, which has zero luma by construction), and where
that offset would leave the RGB cube it is shortened toward grey until the pixel fits. Hue is
kept, saturation gives way, luma stays within rounding (half a level, so 1 level at most by
the fixed-point luma below). It works at any bit depth.

Arrays are (..., 3) in RGB order.
"""

from __future__ import annotations

import numpy as np

_SHIFT = 14
_HALF = 1 << (_SHIFT - 1)
# BT.601 luma weights in 14-bit fixed point; they sum to exactly 1 << 14, so grey stays grey.
_Y_R, _Y_G, _Y_B = 4899, 9617, 1868
_U_B, _V_R = 8061, 14369  # U = 0.492 (B - Y), V = 0.877 (R - Y)
_B_U, _G_U, _G_V, _R_V = 33292, -6472, -9519, 18678  # the inverse: 2.032 u, -0.395 u - 0.581 v, 1.140 v
# Rows per strip of the merges: bounds their float64 temporaries for large images.
_STRIP_ROWS = 256
# BT.601 luma weights exactly (Pillow's "L" uses them to 16 bits); the exact merge keeps this
# luma, which the 14-bit weights above reproduce within 0.01 of an 8-bit level.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])


def luma(rgb: np.ndarray) -> np.ndarray:
    """Fixed-point BT.601 luma of 8-bit RGB (OpenCV's Y), as int64."""
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    return (_Y_B * b + _Y_G * g + _Y_R * r + _HALF) >> _SHIFT


def rgb_to_yuv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """8-bit RGB -> (Y, U, V), each int64 in [0, 255]."""
    r, b = rgb[..., 0].astype(np.int64), rgb[..., 2].astype(np.int64)
    y = luma(rgb)
    u = ((b - y) * _U_B + _HALF + (128 << _SHIFT)) >> _SHIFT
    v = ((r - y) * _V_R + _HALF + (128 << _SHIFT)) >> _SHIFT
    return y, np.clip(u, 0, 255), np.clip(v, 0, 255)


def yuv_to_rgb(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(Y, U, V) in [0, 255] -> 8-bit RGB, saturating."""
    y = np.asarray(y, dtype=np.int64)
    u = np.asarray(u, dtype=np.int64) - 128
    v = np.asarray(v, dtype=np.int64) - 128
    r = y + ((_R_V * v + _HALF) >> _SHIFT)
    g = y + ((_G_U * u + _G_V * v + _HALF) >> _SHIFT)
    b = y + ((_B_U * u + _HALF) >> _SHIFT)
    return np.clip(np.stack([r, g, b], axis=-1), 0, 255).astype(np.uint8)


def _by_rows(merge, gray: np.ndarray, color_rgb: np.ndarray, dtype, rows: int = _STRIP_ROWS) -> np.ndarray:
    """`merge` over strips of rows, so no temporary is many times the image's size."""
    if gray.shape != color_rgb.shape[:-1] or color_rgb.shape[-1] != 3:
        raise ValueError(f"cannot merge luma {gray.shape} with colour {color_rgb.shape}")
    out = np.empty(color_rgb.shape, dtype=dtype)
    for start in range(0, gray.shape[0], rows):
        out[start : start + rows] = merge(gray[start : start + rows], color_rgb[start : start + rows])
    return out


def released_merge(gray: np.ndarray, color_rgb: np.ndarray) -> np.ndarray:
    """Y from the 8-bit grey image (H, W), U and V from the 8-bit colour image (H, W, 3)."""

    def merge(gray, color_rgb):
        _, u, v = rgb_to_yuv(color_rgb)
        return yuv_to_rgb(gray, u, v)

    return _by_rows(merge, gray, color_rgb, np.uint8)


def exact_merge(gray: np.ndarray, color_rgb: np.ndarray, max_value: int = 255) -> np.ndarray:
    """The grey levels (H, W) in [0, max_value] with the colour image's chroma, shortened where
    it would leave the cube. `color_rgb` is 8-bit; its chroma is scaled to max_value. Returns
    uint8 for max_value 255, else uint16."""

    def merge(gray, color_rgb):
        levels = np.asarray(gray, dtype=np.float64)[..., None]
        color = color_rgb.astype(np.float64) * (max_value / 255)
        offset = color - (color @ LUMA_WEIGHTS)[..., None]
        # The largest k in [0, 1] with levels + k * offset inside [0, max_value] in every channel.
        with np.errstate(divide="ignore", invalid="ignore"):
            room = np.where(offset > 0, (max_value - levels) / offset, np.where(offset < 0, -levels / offset, np.inf))
        k = np.clip(room.min(axis=-1, keepdims=True), 0.0, 1.0)
        return np.clip(np.rint(levels + k * offset), 0, max_value)

    return _by_rows(merge, gray, color_rgb, np.uint8 if max_value == 255 else np.uint16)


def max_luma_shift(rgb: np.ndarray, gray: np.ndarray) -> int:
    """Largest |luma(rgb) - gray| in 8-bit levels."""
    shift = 0
    for start in range(0, gray.shape[0], _STRIP_ROWS):
        strip = luma(rgb[start : start + _STRIP_ROWS]) - gray[start : start + _STRIP_ROWS]
        shift = max(shift, int(np.abs(strip).max(initial=0)))
    return shift
