"""Colour correction of the diffusion output against the hint image (spec section 4, step 9).

Inputs and outputs are uint8 CHW tensors, as the released code works on PIL images; its final
conversion truncates (`x * 255` cast to uint8) instead of rounding, and so do we.

Both fixes work in horizontal strips, so that their float temporaries stay the size of a strip,
not of the image (an 8K image is 0.8 GB per float copy):
* wavelet: the five blurs reach 1+2+4+8+16 = 31 pixels, so a strip computed with 32 rows of
  context above and below (cut flush at the image border, where the replicate padding is the
  true one) gives exactly the whole-image result in its own rows;
* AdaIN: the per-channel mean and standard deviation come from exact uint8 histograms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WAVELET_LEVELS = 5
WAVELET_HALO = 32  # > 1 + 2 + 4 + 8 + 16
STRIP_ROWS = 256
_ADAIN_EPS = 1e-5


def _to_unit(image: torch.Tensor) -> torch.Tensor:
    return image.float().unsqueeze(0) / 255.0


def _to_uint8_truncated(image: torch.Tensor) -> torch.Tensor:
    return (image.clamp(0.0, 1.0).squeeze(0) * 255.0).to(torch.uint8)


def wavelet_blur(image: torch.Tensor, radius: int) -> torch.Tensor:
    kernel = (
        torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=image.dtype, device=image.device) / 16.0
    )
    channels = image.shape[1]
    kernel = kernel.expand(channels, 1, 3, 3)
    padded = F.pad(image, (radius,) * 4, mode="replicate")
    return F.conv2d(padded, kernel, groups=channels, dilation=radius)


def wavelet_split(image: torch.Tensor, levels: int = WAVELET_LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    """(high frequencies summed over all levels, the final low-frequency residue)."""
    high = torch.zeros_like(image)
    low = image
    for level in range(levels):
        blurred = wavelet_blur(low, 2**level)
        high += low - blurred
        low = blurred
    return high, low


def _strips(height: int, rows: int, halo: int):
    """(start, stop) of each strip and of its rows with context, cut flush at the border."""
    for start in range(0, height, rows):
        stop = min(height, start + rows)
        yield start, stop, max(0, start - halo), min(height, stop + halo)


def wavelet_color_fix(sr: torch.Tensor, reference: torch.Tensor, rows: int = STRIP_ROWS) -> torch.Tensor:
    """Details from `sr`, colours (the lowest band) from `reference`; both uint8 (3, H, W)."""
    out = torch.empty_like(sr)
    for start, stop, top, bottom in _strips(sr.shape[-2], rows, WAVELET_HALO):
        high, _ = wavelet_split(_to_unit(sr[:, top:bottom]))
        _, low = wavelet_split(_to_unit(reference[:, top:bottom]))
        out[:, start:stop] = _to_uint8_truncated(high + low)[:, start - top : stop - top]
    return out


def _mean_std(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (unbiased, as released) std of a uint8 (3, H, W) image in [0, 1]
    units, computed exactly from its histogram."""
    levels = torch.arange(256, dtype=torch.float64) / 255.0  # on the CPU: MPS has no float64
    counts = torch.stack([torch.bincount(channel.flatten(), minlength=256) for channel in image.cpu()]).double()
    total = counts.sum(1)
    mean = (counts * levels).sum(1) / total
    var = (counts * (levels - mean[:, None]) ** 2).sum(1) / (total - 1)
    as_4d = lambda t: t.float()[None, :, None, None].to(image.device)  # noqa: E731
    return as_4d(mean), as_4d((var + _ADAIN_EPS).sqrt())


def adain_color_fix(sr: torch.Tensor, reference: torch.Tensor, rows: int = STRIP_ROWS) -> torch.Tensor:
    """Per-channel mean and std of `sr` matched to those of `reference`; both uint8 (3, H, W)."""
    content_mean, content_std = _mean_std(sr)
    style_mean, style_std = _mean_std(reference)
    out = torch.empty_like(sr)
    for start, stop, _, _ in _strips(sr.shape[-2], rows, 0):
        content = _to_unit(sr[:, start:stop])
        out[:, start:stop] = _to_uint8_truncated((content - content_mean) / content_std * style_std + style_mean)
    return out


COLOR_FIXES = {"wavelet": wavelet_color_fix, "adain": adain_color_fix}
