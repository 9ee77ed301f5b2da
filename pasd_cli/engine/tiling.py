"""Latent tiling: the tile grid and the blend weights (spec section 4, step 7).

Pure functions over sizes; `denoise.NoisePredictor` runs the networks on the tiles they describe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from . import settings

RELEASED_VARIANCE = 0.01

# The automatic tiling (`auto_tiling`). Tiles are never smaller than the training size: the
# model never saw less context than that. Neighbours overlap by at least MIN_AUTO_OVERLAP.
MIN_AUTO_TILE = settings.MIN_AUTO_TILE
MIN_AUTO_OVERLAP = 8
# A tile's cost, from the FLOP census of SD-1.5-size PASD (spec/PERFORMANCE.md: UNet, ControlNet
# and PACA per sample): a*T^2 + b*T^4 for a tile of side T latents, the T^4 part being attention
# and PACA, quadratic in the tile's pixel count. Fitted at T = 64 and 256 (within 2% at 32, 128,
# 320 and 512); only the ratio matters: the side at which the two parts cost the same.
ATTENTION_BREAKEVEN = 118.5


@dataclass(frozen=True)
class Tile:
    """A square window of the latent, in latent pixels; `row`/`col` index it in its grid."""

    top: int
    left: int
    size: int
    row: int = 0
    col: int = 0

    def slices(self) -> tuple[slice, slice]:
        return slice(self.top, self.top + self.size), slice(self.left, self.left + self.size)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts along one axis, as released: a fixed stride of `tile - overlap`, the last tile flush
    with the far edge; the count is the first n with (n-1)*(tile-overlap) + tile >= length."""
    if not 0 <= overlap < tile <= length:
        raise ValueError(f"need 0 <= overlap ({overlap}) < tile ({tile}) <= length ({length})")
    stride = tile - overlap
    count = 1 + math.ceil((length - tile) / stride)
    return [k * stride for k in range(count - 1)] + [length - tile]


def needs_tiling(height: int, width: int, tile: int) -> bool:
    # The released rule compares areas, so a 400x200 latent is not tiled with tile 320.
    return height * width > tile * tile


def shrunk_overlap(overlap: int, requested_tile: int, tile: int) -> int:
    """The overlap for a tile smaller than requested (halved after running out of memory): at
    most half the tile. Kept as requested, an overlap near the requested side would leave the
    halved tile a stride of a pixel or two: hundreds of times the tiles, a retry that never ends."""
    return overlap if tile >= requested_tile else min(overlap, tile // 2)


@dataclass(frozen=True)
class TileGrid:
    """The released grid: square tiles of side min(tile, height, width), row-major."""

    height: int
    width: int
    size: int
    row_starts: tuple[int, ...]
    col_starts: tuple[int, ...]

    @classmethod
    def build(cls, height: int, width: int, tile: int, overlap: int) -> TileGrid:
        size = min(tile, height, width)
        # A tile clipped to the latent keeps the requested overlap where it still can.
        overlap = min(overlap, size - 1)
        return cls(
            height, width, size, tuple(tile_starts(height, size, overlap)), tuple(tile_starts(width, size, overlap))
        )

    @cached_property
    def tiles(self) -> list[Tile]:
        return [
            Tile(top, left, self.size, row, col)
            for row, top in enumerate(self.row_starts)
            for col, left in enumerate(self.col_starts)
        ]

    def weight(self, tile: Tile, blend: str) -> torch.Tensor:
        """(size, size) float32 blend weight of one tile."""
        if blend == "gaussian":
            return self._released
        if blend == "ramp":
            return torch.outer(self._row_ramps[tile.row], self._col_ramps[tile.col])
        raise ValueError(f"unknown blend {blend!r}")

    @cached_property
    def _released(self) -> torch.Tensor:
        return released_weights(self.size)

    @cached_property
    def _row_ramps(self) -> list[torch.Tensor]:
        return axis_ramps(self.row_starts, self.size)

    @cached_property
    def _col_ramps(self) -> list[torch.Tensor]:
        return axis_ramps(self.col_starts, self.size)


def tile_grid(height: int, width: int, tile: int, overlap: int) -> list[Tile]:
    return TileGrid.build(height, width, tile, overlap).tiles


def released_weights(size: int) -> torch.Tensor:
    """The released separable Gaussian, with its asymmetric centres: (size-1)/2 along x, size/2
    along y. Computed in float64 as released (numpy), used in float32."""
    coords = torch.arange(size, dtype=torch.float64)

    def gaussian(centre: float) -> torch.Tensor:
        return torch.exp(-((coords - centre) ** 2) / (size * size) / (2 * RELEASED_VARIANCE)) / math.sqrt(
            2 * math.pi * RELEASED_VARIANCE
        )

    return torch.outer(gaussian(size / 2), gaussian((size - 1) / 2)).float()


def _rise(band: int, size: int) -> torch.Tensor:
    """Raised cosine from near 0 to 1 over the first `band` pixels (sampled at pixel centres, so
    strictly positive), then 1."""
    coords = torch.arange(size, dtype=torch.float64)
    if band <= 0:
        return torch.ones(size, dtype=torch.float64)
    ramp = ((coords + 0.5) / band).clamp(max=1.0)
    return 0.5 - 0.5 * torch.cos(math.pi * ramp)


def axis_ramps(starts: tuple[int, ...] | list[int], size: int) -> list[torch.Tensor]:
    """1-D weights of each tile along one axis for the `ramp` blend.

    Each tile fades in across the whole band it shares with the previous tile and out across the
    whole band it shares with the next one (the released grid's last tile often overlaps far
    more than `overlap`). Where two tiles meet, the two cosines sum to one, so the blend is a
    smooth cross-fade; at the image border there is no ramp. Every weight is positive, so the
    weight sum never vanishes.
    """
    ramps = []
    for index, start in enumerate(starts):
        before = starts[index - 1] + size - start if index > 0 else 0
        after = start + size - starts[index + 1] if index + 1 < len(starts) else 0
        ramps.append((_rise(before, size) * _rise(after, size).flip(0)).float())
    return ramps


def tile_cost(height: int, width: int) -> float:
    """Relative denoiser FLOPs of one pass over a height x width latent window (see
    ATTENTION_BREAKEVEN): linear in its pixels plus attention, quadratic in them."""
    pixels = height * width
    return pixels * (1.0 + pixels / ATTENTION_BREAKEVEN**2)


def axis_count(length: int, tile: int, overlap: int) -> int:
    """Tiles of side `tile` overlapping by at least `overlap` that cover `length`."""
    return 1 if tile >= length else 1 + math.ceil((length - tile) / (tile - overlap))


def even_overlap(length: int, tile: int, count: int) -> int | None:
    """The largest overlap at which `count` tiles cover `length` (None: one tile)."""
    return None if count <= 1 else (count * tile - length) // (count - 1)


@dataclass(frozen=True)
class LatentTiling:
    """A tiling of a latent: square tiles of `tile` latents overlapping by `overlap` (a tile of at
    least the latent's longer side: untiled), and its relative cost (`tile_cost` summed)."""

    tile: int
    overlap: int
    tiles: int
    cost: float


def auto_tiling(
    height: int,
    width: int,
    min_overlap: int | None = None,
    max_tile: int | None = None,
    min_tile: int | None = None,
) -> LatentTiling:
    """The tiling of a height x width latent that costs the fewest FLOPs.

    Attention makes a tile's cost grow with the square of its pixel count, so small tiles are
    cheaper per pixel, while overlaps make them do work twice: the cheapest tiles are a little
    above the training size, which no tile goes under (`min_tile`: a latent whose short side is
    shorter is not tiled, since square tiles could not reach the training size along it).
    Each candidate side gets the fewest tiles that cover the latent with `min_overlap` (default
    MIN_AUTO_OVERLAP), and then the largest overlap at which that many tiles still cover it: as
    many tiles, more overlap, no extra work, and equal strides. `max_tile` bounds the side (a
    device whose attention must fit one buffer); ties go to the larger tile.
    """
    if height < 1 or width < 1:
        raise ValueError(f"empty latent {height}x{width}")
    min_overlap = MIN_AUTO_OVERLAP if min_overlap is None else min_overlap
    min_tile = MIN_AUTO_TILE if min_tile is None else min_tile
    short, long = min(height, width), max(height, width)
    untiled = LatentTiling(long, min_overlap, 1, tile_cost(height, width))
    if max_tile is None or max_tile >= long:
        best = untiled
        if long <= min_tile:
            return best
    else:
        best = None
    high = min(short, max_tile) if max_tile is not None else short
    # Square tiles are at most the short side: under the training size, only the device's cap
    # may cut a latent into tiles.
    low = min_tile if best is not None else min(min_tile, high)
    for tile in range(low, high + 1):
        if tile <= min_overlap:
            continue
        rows, cols = axis_count(height, tile, min_overlap), axis_count(width, tile, min_overlap)
        cost = rows * cols * tile_cost(tile, tile)
        if best is None or cost <= best.cost:
            overlaps = [o for o in (even_overlap(height, tile, rows), even_overlap(width, tile, cols)) if o is not None]
            overlap = min(overlaps, default=min_overlap)
            best = LatentTiling(tile, max(overlap, min_overlap), rows * cols, cost)
    if best is None:
        raise ValueError(f"no tile fits: max_tile {max_tile} is not above the overlap {min_overlap}")
    return best
