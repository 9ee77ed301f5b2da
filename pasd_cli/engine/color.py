"""Colour correction of the diffusion output against the hint image (spec section 4, step 9).

Inputs and outputs are uint8 CHW tensors, as the released code works on PIL images; its final
conversion truncates (`x * 255` cast to uint8) instead of rounding, and so do we.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WAVELET_LEVELS = 5
_ADAIN_EPS = 1e-5


def _to_unit(image: torch.Tensor) -> torch.Tensor:
    return image.float().unsqueeze(0) / 255.0


def _to_uint8_truncated(image: torch.Tensor) -> torch.Tensor:
    return (image.clamp(0.0, 1.0).squeeze(0) * 255.0).to(torch.uint8)


def wavelet_blur(image: torch.Tensor, radius: int) -> torch.Tensor:
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]],
                          dtype=image.dtype, device=image.device) / 16.0
    channels = image.shape[1]
    kernel = kernel.expand(channels, 1, 3, 3)
    padded = F.pad(image, (radius,) * 4, mode="replicate")
    return F.conv2d(padded, kernel, groups=channels, dilation=radius)


def wavelet_split(image: torch.Tensor, levels: int = WAVELET_LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    """(high frequencies summed over all levels, the final low-frequency residue)."""
    high = torch.zeros_like(image)
    low = image
    for level in range(levels):
        blurred = wavelet_blur(low, 2 ** level)
        high += low - blurred
        low = blurred
    return high, low


def wavelet_color_fix(sr: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Details from `sr`, colours (the lowest band) from `reference`; both uint8 (3, H, W)."""
    high, _ = wavelet_split(_to_unit(sr))
    _, low = wavelet_split(_to_unit(reference))
    return _to_uint8_truncated(high + low)


def _mean_std(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = image.flatten(2)
    return flat.mean(2)[..., None, None], (flat.var(2) + _ADAIN_EPS).sqrt()[..., None, None]


def adain_color_fix(sr: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-channel mean and std of `sr` matched to those of `reference`; both uint8 (3, H, W)."""
    content, style = _to_unit(sr), _to_unit(reference)
    content_mean, content_std = _mean_std(content)
    style_mean, style_std = _mean_std(style)
    return _to_uint8_truncated((content - content_mean) / content_std * style_std + style_mean)


COLOR_FIXES = {"wavelet": wavelet_color_fix, "adain": adain_color_fix}
