"""Small VAEs built in code for the VAE tests."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL


def sd_structured_vae() -> AutoencoderKL:
    """The SD 1.5 VAE's structure (2 resnets per down block, 3 per up block, 4 levels) at tiny
    widths, with every parameter randomised so GroupNorm's affine part matters too."""
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=2,
        norm_num_groups=4,
        latent_channels=4,
    ).eval()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in sorted(vae.named_parameters()):
            if param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=g) / param[0].numel() ** 0.5)
            else:
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(param.shape, generator=g))
    return vae
