"""No seams: a smooth gradient upscaled with latent and VAE tiling shows no more gradient across
tile borders than elsewhere.

The measure: the mean absolute difference between neighbouring pixels, across a set of lines
(columns, and rows: both directions), relative to the same over the other latent-pixel lines
(multiples of 8 px, away from the image edges, so the VAE's 8-px structure cancels). Two kinds
of line can carry a seam: tile edges (where a hard-edged weight switches a tile on or off) and
the middles of overlaps (where the released Gaussian weights cross over steeply).

The random tiny model's tiles barely disagree, so with it even hard-edged weights leave no
seam; to show the measure catches real seams, a second test makes neighbouring tiles disagree
(a term from each tile's own mean, standing in for a trained model's tile-wide context).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pasd_cli.engine import UpscaleSettings, tiling
from pasd_cli.engine.pipeline import image_to_tensor
from pasd_cli.engine.vae_tiling import TiledSection

TILE, OVERLAP, LATENT = 16, 8, 40  # a regular 4x4 grid of 16-latent tiles over a 320 px image
VAE_TILE = 112  # cuts at 104 and 216 px, apart from the latent tile lines


def gradient_image(side: int) -> Image.Image:
    yy, xx = np.mgrid[0:side, 0:side]
    return Image.fromarray(
        np.stack([xx / side * 255, yy / side * 255, (xx + yy) / (2 * side) * 255], -1).astype(np.uint8)
    )


def line_ratio(image: torch.Tensor, lines: list[int]) -> float:
    x = image.float()
    steps = lambda x: (x[..., 1:] - x[..., :-1]).abs().mean(dim=tuple(range(x.ndim - 1)))  # noqa: E731
    both = steps(x) + steps(x.transpose(-1, -2))
    candidates = range(16, x.shape[-1] - 15, 8)
    at = [c - 1 for c in candidates if c in lines]
    other = [c - 1 for c in candidates if c not in lines]
    return (both[at].mean() / both[other].mean()).item()


STARTS = tiling.tile_starts(LATENT, TILE, OVERLAP)
TILE_EDGES = sorted({8 * s for s in STARTS} | {8 * (s + TILE) for s in STARTS})
OVERLAP_MIDDLES = [8 * ((STARTS[k] + TILE + STARTS[k + 1]) // 2) for k in range(len(STARTS) - 1)]
VAE_CUTS = sorted({8 * box[1] for box in TiledSection(None, []).cores(LATENT, LATENT, VAE_TILE // 8)} - {0})


def upscale(pipeline, **options) -> torch.Tensor:
    settings = UpscaleSettings(
        **{
            **dict(
                steps=2, scale=4, process_size=64, guidance=1.0, latent_tile=TILE, latent_overlap=OVERLAP, vae_tile=0
            ),
            **options,
        }
    )
    return image_to_tensor(pipeline.upscale(gradient_image(LATENT * 2), settings).image)


def ratios(image: torch.Tensor) -> dict[str, float]:
    return {
        "tile edges": line_ratio(image, TILE_EDGES),
        "overlap middles": line_ratio(image, OVERLAP_MIDDLES),
        "VAE tile edges": line_ratio(image, VAE_CUTS),
    }


def test_no_seams_on_a_smooth_gradient(tiny_pipeline):
    """Must-show 2: ramp-blended latent tiles and exact VAE tiles, each line set within 10%."""
    assert VAE_CUTS and not set(VAE_CUTS) & set(TILE_EDGES + OVERLAP_MIDDLES)
    untiled = ratios(upscale(tiny_pipeline, latent_tile=LATENT))
    tiled = ratios(upscale(tiny_pipeline, blend="ramp", vae_tile=VAE_TILE))
    print(f"\nuntiled: {untiled}\ntiled:   {tiled}")
    assert all(abs(value - 1) <= 0.1 for value in untiled.values())  # the measure is unbiased here
    assert all(abs(value - 1) <= 0.1 for value in tiled.values())


class DisagreeingUNet(torch.nn.Module):
    """The PASD UNet plus `strength` x the tile's mean latent: each tile's prediction depends on
    everything in the tile, as a trained model's does through GroupNorm and attention."""

    def __init__(self, unet, strength: float):
        super().__init__()
        self.unet, self.strength = unet, strength

    @property
    def dtype(self):
        return self.unet.dtype

    def forward(self, sample, t, text, **kwargs):
        eps = self.unet(sample, t, text, **kwargs)[0]
        return (eps + self.strength * sample.mean(dim=(2, 3), keepdim=True),)


@pytest.fixture
def disagreeing(tiny_pipeline):
    unet = tiny_pipeline.unet
    tiny_pipeline.unet = DisagreeingUNet(unet, 15.0)
    yield tiny_pipeline
    tiny_pipeline.unet = unet


def test_the_measure_catches_seams_when_tiles_disagree(disagreeing, monkeypatch):
    untiled = ratios(upscale(disagreeing, latent_tile=LATENT))
    ramp = ratios(upscale(disagreeing, blend="ramp"))
    gaussian = ratios(upscale(disagreeing, blend="gaussian"))
    monkeypatch.setattr(tiling.TileGrid, "weight", lambda self, tile, blend: torch.ones(self.size, self.size))
    hard = ratios(upscale(disagreeing, blend="ramp"))
    print(f"\nuntiled: {untiled}\nramp: {ramp}\nreleased gaussian: {gaussian}\nhard-edged: {hard}")
    assert hard["tile edges"] > 1.3  # a step where each tile starts and ends
    assert gaussian["overlap middles"] > 1.3  # a step where the released Gaussians cross over
    # The ramp cross-fades over the whole overlap: no line stands out like those steps.
    worst_ramp = max(ramp["tile edges"], ramp["overlap middles"])
    assert worst_ramp < 1.2 and worst_ramp - 1 < (gaussian["overlap middles"] - 1) / 2


@pytest.fixture
def auto_at_tiny_scale(monkeypatch):
    """The automatic tiling's rules scaled to the tiny test image (a 40-latent side, as a 2048 px
    output is 256): training size 16, overlap at least 4, the attention break-even a quarter of
    SD 1.5's. Returns the tiling it then picks for the image."""
    monkeypatch.setattr(tiling, "MIN_AUTO_TILE", 16)
    monkeypatch.setattr(tiling, "MIN_AUTO_OVERLAP", 4)
    monkeypatch.setattr(tiling, "ATTENTION_BREAKEVEN", tiling.ATTENTION_BREAKEVEN / 4)
    return tiling.auto_tiling(LATENT, LATENT)


def auto_ratios(pipeline, plan) -> dict[str, float]:
    """The seam measure for an image made with the defaults (automatic tiling, automatic blend)."""
    starts = tiling.tile_starts(LATENT, plan.tile, plan.overlap)
    edges = sorted({8 * s for s in starts} | {8 * (s + plan.tile) for s in starts})
    middles = [8 * ((starts[k] + plan.tile + starts[k + 1]) // 2) for k in range(len(starts) - 1)]
    settings = UpscaleSettings(steps=2, scale=4, process_size=64, guidance=1.0, vae_tile=0)
    image = image_to_tensor(pipeline.upscale(gradient_image(LATENT * 2), settings).image)
    return {"tile edges": line_ratio(image, edges), "overlap middles": line_ratio(image, middles)}


def test_no_seams_with_the_automatic_tiling(tiny_pipeline, auto_at_tiny_scale):
    assert auto_at_tiny_scale.tiles > 1  # the defaults do cut this image
    auto = auto_ratios(tiny_pipeline, auto_at_tiny_scale)
    print(f"\nautomatic {auto_at_tiny_scale}: {auto}")
    assert all(abs(value - 1) <= 0.1 for value in auto.values())
