"""VAE encode/decode for the pipeline: posterior moments in, raw decoder output out."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL


class VaeCodec:
    """Whole-image VAE passes. `dtype` is the VAE's compute dtype; results come back float32."""

    def __init__(self, vae: AutoencoderKL):
        self.vae = vae

    @property
    def scaling_factor(self) -> float:
        return self.vae.config.scaling_factor

    def _input(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=self.vae.device, dtype=self.vae.dtype)

    def encode_moments(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`image` in [0, 1], (1, 3, H, W) -> posterior mean and std, (1, 4, H/8, W/8)."""
        posterior = self.vae.encode(self._input(image * 2 - 1)).latent_dist
        return posterior.mean.float(), posterior.std.float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents -> decoder output in about [-1, 1], before clamping."""
        return self.vae.decode(self._input(latents)).sample.float()
