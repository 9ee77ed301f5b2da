"""One denoising prediction: ControlNet, then the PASD UNet, then classifier-free guidance,
over the whole latent or over blended tiles (spec section 4, steps 6 and 7)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..nn.controlnet import EmbeddedHint
from .tiling import Tile, TileGrid, needs_tiling

TileProgress = Callable[[int, int], None]

# The DRM embeddings kept between steps. The DRM costs about 1% of a ControlNet + UNet pass,
# so tiles beyond this budget are simply embedded again at each step.
HINT_CACHE_BYTES = 256 * 2**20


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


def hint_crop(hint: torch.Tensor, tile: Tile | None) -> torch.Tensor:
    """The hint pixels under a latent tile (8x its window), as float in [0, 1].

    `hint` may be uint8, so that a large image's hint is held at one byte per value and only
    the tile being processed is converted; x/255 gives the same floats either way.
    """
    if tile is not None:
        rows, cols = tile.slices()
        hint = hint[:, :, rows.start * 8 : rows.stop * 8, cols.start * 8 : cols.stop * 8]
    return hint.float() / 255.0 if hint.dtype == torch.uint8 else hint


class NoisePredictor:
    """Predicts the guided noise for a latent; built once per image.

    Per forward pass: the CFG pair runs as one batch, and up to `tile_batch` tiles run together.
    Each tile's hint crop goes through the DRM once for the whole run (within a memory budget):
    the DRM sees neither the timestep nor the prompt, so reusing its output is exact. The crop
    is embedded per tile, as released, not cut from a whole-image embedding, whose values near
    tile edges would differ (zero padding at the crop's border).
    """

    def __init__(
        self,
        unet,
        controlnet,
        prompt_embeds: torch.Tensor,
        hint: torch.Tensor,
        guidance: Guidance,
        latent_tile: int,
        latent_overlap: int,
        tile_batch: int = 1,
        blend: str = "gaussian",
        dtype: torch.dtype = torch.float32,
        on_tile: TileProgress | None = None,
        hint_cache_bytes: int = HINT_CACHE_BYTES,
    ):
        self.unet, self.controlnet = unet, controlnet
        self.prompt_embeds = prompt_embeds.to(dtype)
        self.hint = hint
        self.guidance = guidance
        self.tile, self.overlap, self.tile_batch = latent_tile, latent_overlap, tile_batch
        self.blend = blend
        self.dtype = dtype
        self.on_tile = on_tile
        self.hint_cache_bytes = hint_cache_bytes
        self._embedded: dict[Tile | None, torch.Tensor] = {}
        self._cached_bytes = 0
        self._blend: tuple[tuple, list[Tile], list[torch.Tensor], torch.Tensor] | None = None

    def _hint_embedding(self, tile: Tile | None) -> torch.Tensor:
        if tile in self._embedded:
            return self._embedded[tile]
        embedding = self.controlnet.embed_hint(hint_crop(self.hint, tile).to(self.dtype)).embedding
        size = embedding.numel() * embedding.element_size()
        # Tiles are visited in the same order every step, so keeping the first ones that fit
        # (rather than evicting) is the best a bounded cache can do for this access pattern.
        if self._cached_bytes + size <= self.hint_cache_bytes:
            self._embedded[tile] = embedding
            self._cached_bytes += size
        return embedding

    def _run(self, latents: torch.Tensor, t: torch.Tensor, hint_embedding: torch.Tensor) -> torch.Tensor:
        """Networks on a batch of `n` latents; returns guided eps, (n, 4, h, w), float32."""
        count = latents.shape[0]
        copies = 2 if self.guidance.cfg else 1
        sample = latents.to(self.dtype).repeat(copies, 1, 1, 1)
        text = self.prompt_embeds.repeat_interleave(count, dim=0)
        hint = EmbeddedHint(hint_embedding.repeat(copies, 1, 1, 1))
        down, mid = self.controlnet(
            sample,
            t,
            encoder_hidden_states=text,
            controlnet_cond=hint,
            conditioning_scale=self.guidance.conditioning_scale,
            return_dict=False,
        )
        eps = self.unet(
            sample, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid, return_dict=False
        )[0]
        return self.guidance.combine(eps.float(), count)

    def __call__(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        height, width = latents.shape[-2:]
        if not needs_tiling(height, width, self.tile):
            return self._run(latents, t, self._hint_embedding(None))
        return self._tiled(latents, t)

    def _blend_weights(self, latents: torch.Tensor) -> tuple[list[Tile], list[torch.Tensor], torch.Tensor]:
        """The tiles, their blend weights and the weights' sum, on the latents' device; made once
        per predictor, since a copy from the CPU at every tile of every step would each time wait
        for the device to finish its queued work."""
        height, width = latents.shape[-2:]
        key = (height, width, latents.device)
        if self._blend is None or self._blend[0] != key:
            grid = TileGrid.build(height, width, self.tile, self.overlap)
            moved: dict[int, torch.Tensor] = {}  # the released blend gives every tile one tensor
            weights = []
            weight_sum = torch.zeros((1, 1, height, width), device=latents.device)
            for tile in grid.tiles:
                weight = grid.weight(tile, self.blend)
                if id(weight) not in moved:
                    moved[id(weight)] = weight.to(latents.device)
                weights.append(moved[id(weight)])
                weight_sum[(..., *tile.slices())] += weights[-1]
            self._blend = (key, grid.tiles, weights, weight_sum)
        return self._blend[1:]

    def _tiled(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Blend of the tiles' guided predictions. Guidance is linear and every tile's weight is
        the same for both halves of the CFG pair, so guiding before blending equals the released
        order (blend, then guide) up to rounding."""
        tiles, weights, weight_sum = self._blend_weights(latents)
        total = torch.zeros_like(latents, dtype=torch.float32)
        for first in range(0, len(tiles), self.tile_batch):
            batch = tiles[first : first + self.tile_batch]
            tile_latents = torch.cat([latents[(..., *tile.slices())] for tile in batch])
            embeddings = torch.cat([self._hint_embedding(tile) for tile in batch])
            eps = self._run(tile_latents, t, embeddings)
            for tile, weight, tile_eps in zip(batch, weights[first : first + len(batch)], eps):
                total[(..., *tile.slices())] += tile_eps * weight
            if self.on_tile:
                self.on_tile(first + len(batch), len(tiles))
        return total / weight_sum
