"""Bilinear resize of uint8 images with OpenCV's `INTER_LINEAR` arithmetic, without OpenCV.

The released colorization path resizes its result back to the input size with `cv2.resize`.
OpenCV's 8-bit linear resize is fixed point: half-pixel centres, no antialiasing, 11-bit tap
weights rounded from float32 positions; a horizontal pass into int rows, then a vertical pass
that drops 4 bits of each row, keeps the high 16 bits of its product with the weight and
rounds the sum by 2 bits (its SIMD kernel, which the x86-64 build applies to every column).
The formula here matched cv2 4.11.0 (opencv-python-headless, x86-64) bit for bit on random
sizes and channel counts (tests/fixtures/cv2_resize.npz). A float bilinear resize would be
within 1 level.
"""

from __future__ import annotations

import numpy as np

_COEF_BITS = 11
_ONE = 1 << _COEF_BITS
# Output rows per strip: bounds the int32 temporaries for large images.
_STRIP_ROWS = 256


def _taps(src: int, dst: int, clamp_weights: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(first index, second index, first weight, second weight) for each output position.

    OpenCV resets the horizontal weight at the borders but keeps the vertical one and clamps
    the row index instead; the vertical kernel's rounding makes the difference visible.
    """
    scale = 1.0 / (dst / src)  # OpenCV inverts the double ratio dst/src
    pos = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    first = np.floor(pos).astype(np.int64)
    frac = (pos - first.astype(np.float32)).astype(np.float32)
    if clamp_weights:
        outside = (first < 0) | (first >= src - 1)
        frac[outside] = 0
        first = np.clip(first, 0, src - 1)
    # saturate_cast<short>(float) rounds half to even, as np.rint does.
    w0 = np.rint((np.float32(1) - frac) * np.float32(_ONE)).astype(np.int32)
    w1 = np.rint(frac * np.float32(_ONE)).astype(np.int32)
    return np.clip(first, 0, src - 1), np.clip(first + 1, 0, src - 1), w0, w1


def _area_half(image: np.ndarray) -> np.ndarray:
    # OpenCV takes INTER_AREA for an exact 2x reduction: the rounded mean of each 2x2 block.
    s = image.astype(np.int32)
    total = s[0::2, 0::2] + s[0::2, 1::2] + s[1::2, 0::2] + s[1::2, 1::2]
    return ((total + 2) >> 2).astype(np.uint8)


def resize_linear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W) or (H, W, C) -> the same layout at size = (width, height)."""
    if image.dtype != np.uint8:
        raise ValueError(f"resize_linear takes uint8 images, got {image.dtype}")
    width, height = size
    if width < 1 or height < 1:
        raise ValueError(f"cannot resize to {width}x{height}")
    squeeze = image.ndim == 2
    pixels = image[..., None] if squeeze else image
    src_h, src_w, channels = pixels.shape
    if (src_h, src_w) == (height, width):
        out = pixels.copy()
    elif (src_h, src_w) == (2 * height, 2 * width):
        out = _area_half(pixels)
    else:
        out = _resize(pixels, width, height)
    return out[..., 0] if squeeze else out


def _resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    src_h, src_w, channels = pixels.shape
    x0, x1, a0, a1 = _taps(src_w, width, clamp_weights=True)
    y0, y1, b0, b1 = _taps(src_h, height, clamp_weights=False)
    a0, a1 = a0[None, :, None], a1[None, :, None]
    out = np.empty((height, width, channels), dtype=np.uint8)
    for start in range(0, height, _STRIP_ROWS):
        rows = slice(start, min(start + _STRIP_ROWS, height))
        needed = np.unique(np.concatenate([y0[rows], y1[rows]]))
        source = pixels[needed].astype(np.int32)
        # Horizontal pass: each needed source row once, in units of 1/2048.
        horizontal = source[:, x0] * a0 + source[:, x1] * a1
        r0 = horizontal[np.searchsorted(needed, y0[rows])] >> 4
        r1 = horizontal[np.searchsorted(needed, y1[rows])] >> 4
        c0, c1 = b0[rows, None, None], b1[rows, None, None]
        value = (((r0 * c0) >> 16) + ((r1 * c1) >> 16) + 2) >> 2
        out[rows] = np.clip(value, 0, 255).astype(np.uint8)
    return out
