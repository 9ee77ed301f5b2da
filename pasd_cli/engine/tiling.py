"""Latent tiling: the tile grid and the blend weights (spec section 4, step 7).

Pure functions over sizes; the pipeline runs the networks on the tiles they describe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

RELEASED_VARIANCE = 0.01


@dataclass(frozen=True)
class Tile:
    """A square window of the latent, in latent pixels."""

    top: int
    left: int
    size: int

    def slices(self) -> tuple[slice, slice]:
        return slice(self.top, self.top + self.size), slice(self.left, self.left + self.size)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts along one axis: a fixed stride of `tile - overlap`, the last tile flush with the far
    edge; the count is the smallest that covers `length`."""
    if not 0 <= overlap < tile <= length:
        raise ValueError(f"need 0 <= overlap ({overlap}) < tile ({tile}) <= length ({length})")
    stride = tile - overlap
    count = 1 + math.ceil((length - tile) / stride)
    return [k * stride for k in range(count - 1)] + [length - tile]


def needs_tiling(height: int, width: int, tile: int) -> bool:
    # The released rule compares areas, so a 400x200 latent is not tiled with tile 320.
    return height * width > tile * tile


def tile_grid(height: int, width: int, tile: int, overlap: int) -> list[Tile]:
    size = min(tile, height, width)
    return [Tile(top, left, size)
            for top in tile_starts(height, size, overlap)
            for left in tile_starts(width, size, overlap)]


def released_weights(size: int) -> torch.Tensor:
    """The released separable Gaussian, with its asymmetric centres: (size-1)/2 along x, size/2
    along y."""
    coords = torch.arange(size, dtype=torch.float64)

    def gaussian(centre: float) -> torch.Tensor:
        return (torch.exp(-((coords - centre) ** 2) / (size * size) / (2 * RELEASED_VARIANCE))
                / math.sqrt(2 * math.pi * RELEASED_VARIANCE))

    return torch.outer(gaussian(size / 2), gaussian((size - 1) / 2)).float()


def ramp_weights(size: int, overlap: int) -> torch.Tensor:
    """A weight that rises smoothly over the whole overlap and is flat inside.

    Neighbouring tiles cross-fade across their full shared band, so no tile edge carries a jump;
    the floor keeps every pixel's weight sum positive.
    """
    coords = torch.arange(size, dtype=torch.float64)
    distance = torch.minimum(coords, size - 1 - coords)
    ramp = ((distance + 1) / (overlap + 1)).clamp(max=1.0) if overlap else torch.ones(size, dtype=torch.float64)
    smooth = 0.5 - 0.5 * torch.cos(math.pi * ramp)
    return torch.outer(smooth, smooth).float().clamp(min=1e-3)


BLEND_WEIGHTS = {"gaussian": lambda size, overlap: released_weights(size), "ramp": ramp_weights}
