"""One denoising prediction: ControlNet, then the PASD UNet, then classifier-free guidance,
over the whole latent or over blended tiles (spec section 4, steps 6 and 7)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..nn.controlnet import EmbeddedHint
from .tiling import BLEND_WEIGHTS, Tile, needs_tiling, tile_grid

TileProgress = Callable[[int, int], None]


@dataclass(frozen=True)
class Guidance:
    scale: float
    conditioning_scale: float

    @property
    def cfg(self) -> bool:
        return self.scale > 1.0

    def combine(self, eps: torch.Tensor, count: int) -> torch.Tensor:
        """Batch layout [negatives..., positives...] -> guided prediction for `count` samples."""
        if not self.cfg:
            return eps
        negative, positive = eps[:count], eps[count:]
        return negative + self.scale * (positive - negative)


class NoisePredictor:
    """Predicts the guided noise for a latent; built once per image.

    The hint goes through the ControlNet's DRM once per tile for the whole run: the DRM sees
    neither the timestep nor the prompt, so reusing its output is exact.
    """

    def __init__(self, unet, controlnet, prompt_embeds: torch.Tensor, hint: torch.Tensor,
                 guidance: Guidance, latent_tile: int, latent_overlap: int, tile_batch: int = 1,
                 blend: str = "gaussian", dtype: torch.dtype = torch.float32,
                 on_tile: TileProgress | None = None):
        self.unet, self.controlnet = unet, controlnet
        self.prompt_embeds = prompt_embeds.to(dtype)
        self.hint = hint
        self.guidance = guidance
        self.tile, self.overlap, self.tile_batch = latent_tile, latent_overlap, tile_batch
        self.blend = blend
        self.dtype = dtype
        self.on_tile = on_tile
        self._embedded: dict[Tile | None, torch.Tensor] = {}

    def _hint_embedding(self, tile: Tile | None) -> torch.Tensor:
        if tile not in self._embedded:
            hint = self.hint
            if tile is not None:
                rows, cols = tile.slices()
                hint = hint[:, :, rows.start * 8:rows.stop * 8, cols.start * 8:cols.stop * 8]
            self._embedded[tile] = self.controlnet.embed_hint(hint.to(self.dtype)).embedding
        return self._embedded[tile]

    def _run(self, latents: torch.Tensor, t: torch.Tensor, hint_embedding: torch.Tensor) -> torch.Tensor:
        """Networks on a batch of `n` latents; returns guided eps, (n, 4, h, w), float32."""
        count = latents.shape[0]
        copies = 2 if self.guidance.cfg else 1
        sample = latents.to(self.dtype).repeat(copies, 1, 1, 1)
        text = self.prompt_embeds.repeat_interleave(count, dim=0)
        hint = EmbeddedHint(hint_embedding.repeat(copies, 1, 1, 1))
        down, mid = self.controlnet(sample, t, encoder_hidden_states=text, controlnet_cond=hint,
                                    conditioning_scale=self.guidance.conditioning_scale, return_dict=False)
        eps = self.unet(sample, t, text, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid, return_dict=False)[0]
        return self.guidance.combine(eps.float(), count)

    def __call__(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        height, width = latents.shape[-2:]
        if not needs_tiling(height, width, self.tile):
            return self._run(latents, t, self._hint_embedding(None))
        return self._tiled(latents, t)

    def _tiled(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        height, width = latents.shape[-2:]
        tiles = tile_grid(height, width, self.tile, self.overlap)
        weights = BLEND_WEIGHTS[self.blend](tiles[0].size, self.overlap).to(latents.device)
        total = torch.zeros_like(latents)
        weight_sum = torch.zeros((1, 1, height, width), device=latents.device)
        for first in range(0, len(tiles), self.tile_batch):
            batch = tiles[first:first + self.tile_batch]
            tile_latents = torch.cat([latents[(..., *tile.slices())] for tile in batch])
            embeddings = torch.cat([self._hint_embedding(tile) for tile in batch])
            eps = self._run(tile_latents, t, embeddings)
            for tile, tile_eps in zip(batch, eps):
                total[(..., *tile.slices())] += tile_eps * weights
                weight_sum[(..., *tile.slices())] += weights
            if self.on_tile:
                self.on_tile(first + len(batch), len(tiles))
        return total / weight_sum
