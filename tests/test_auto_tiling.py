"""The automatic latent tiling (`--latent-tile auto`): its shape rules, and its FLOPs against
the released tiling's, counted with torch's FlopCounterMode on SD-1.5-size PASD networks built
on the meta device (no weights, no arithmetic: seconds)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_PASD
from torch.utils.flop_counter import FlopCounterMode

from pasd_cli.engine import tiling
from pasd_cli.engine.settings import RELEASED_LATENT_OVERLAP, RELEASED_LATENT_TILE
from pasd_cli.engine.tiling import MIN_AUTO_OVERLAP, MIN_AUTO_TILE, TileGrid, auto_tiling, needs_tiling
from pasd_cli.nn.controlnet import EmbeddedHint
from pasd_cli.nn.loading import build_pasd_controlnet, build_pasd_unet, read_config
from pasd_cli.nn.unet import FULL

# SD 1.5's sizes over the tiny checkpoint's configs (which have SD 1.5's block layout).
SD15 = {"block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768, "norm_num_groups": 32}
SD15_DRM = {"conditioning_embedding_out_channels": [16, 32, 96, 256]}


@pytest.mark.parametrize("height,width", [(8, 8), (14, 20), (40, 40), (64, 64), (64, 30), (50, 64)])
def test_latents_up_to_the_training_size_are_not_tiled(height, width):
    plan = auto_tiling(height, width)
    assert plan.tiles == 1 and not needs_tiling(height, width, plan.tile)


@pytest.mark.parametrize("height", [65, 72, 96, 100, 128, 150, 200, 256, 300, 333, 512])
@pytest.mark.parametrize("width", [65, 97, 256, 512, 1024])
def test_tiles_are_never_under_the_training_size_and_cover_the_latent(height, width):
    plan = auto_tiling(height, width)
    grid = TileGrid.build(height, width, plan.tile, plan.overlap)
    assert plan.tile >= MIN_AUTO_TILE and plan.overlap >= MIN_AUTO_OVERLAP
    if plan.tiles > 1:
        assert len(grid.tiles) == plan.tiles and needs_tiling(height, width, plan.tile)
        assert grid.row_starts[-1] + grid.size == height and grid.col_starts[-1] + grid.size == width
        # Equal strides where the overlap spreads evenly: only the last step may be shorter.
        for starts in (grid.row_starts, grid.col_starts):
            steps = {b - a for a, b in zip(starts[:-2], starts[1:-1])}
            assert len(steps) <= 1 and all(starts[-1] - starts[-2] <= s for s in steps)


def test_the_cheapest_tiles_are_a_little_above_the_training_size():
    # A 2048 px output: 4 x 4 tiles of 70 latents (16 x 1.35 x 4900) cost less than 5 x 5 of 64
    # (25 x 1.29 x 4096), and far less than one 256-latent pass (5.7 x 65536).
    assert auto_tiling(256, 256) == tiling.LatentTiling(70, 8, 16, pytest.approx(16 * tiling.tile_cost(70, 70)))
    assert tiling.tile_starts(256, 70, 8) == [0, 62, 124, 186]  # evenly: (4 x 70 - 256) / 3 = 8
    assert (auto_tiling(512, 512).tile, auto_tiling(512, 512).tiles) == (64, 81)
    assert all(64 <= auto_tiling(side, side).tile <= 88 for side in range(128, 1025, 16))


def test_a_device_cap_and_a_given_overlap_are_kept():
    plan = auto_tiling(256, 256, max_tile=40, min_overlap=4)
    assert plan.tile <= 40 and plan.overlap >= 4 and plan.tiles > 1
    assert auto_tiling(100, 100, min_overlap=20).overlap >= 20


def test_untiled_wins_where_tiling_only_adds_overlap():
    assert auto_tiling(96, 64).tiles == 1  # two 64-tiles would do 1.2x the work of one pass


def test_a_strip_under_the_training_size_is_not_cut_into_smaller_squares():
    assert auto_tiling(48, 200).tiles == 1
    assert auto_tiling(48, 200, max_tile=40).tile == 40  # unless the device needs it


# --- FLOPs (must-show 3) ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd15_networks():
    unet_config = {**read_config(TINY_PASD / "unet"), **SD15}
    controlnet_config = {**read_config(TINY_PASD / "controlnet"), **SD15, **SD15_DRM}
    with torch.device("meta"):
        unet = build_pasd_unet(unet_config, FULL)
        controlnet = build_pasd_controlnet(controlnet_config, 0)
    return unet.eval(), controlnet.eval()


_flops: dict[int, int] = {}


def pass_flops(networks, side: int) -> int:
    """FLOPs of one ControlNet + PASD UNet pass over one side x side latent tile, one sample (the
    DRM's embedding is made once per tile and reused, so it is not counted)."""
    if side not in _flops:
        unet, controlnet = networks
        with torch.device("meta"):
            sample = torch.empty(1, 4, side, side)
            text = torch.empty(1, 77, 768)
            hint = EmbeddedHint(torch.empty(1, controlnet.config.block_out_channels[0], side, side))
            t = torch.tensor(500)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            down, mid = controlnet(sample, t, encoder_hidden_states=text, controlnet_cond=hint, return_dict=False)
            unet(sample, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid)
        _flops[side] = counter.get_total_flops()
    return _flops[side]


def step_flops(networks, height: int, width: int, tile: int, overlap: int) -> int:
    """FLOPs of one denoising step over the latent with the pipeline's grid for tile/overlap."""
    if not needs_tiling(height, width, tile):
        assert height == width  # the square sizes below
        return pass_flops(networks, height)
    grid = TileGrid.build(height, width, tile, overlap)
    return len(grid.tiles) * pass_flops(networks, grid.size)


def test_the_census_matches_the_counted_flops(sd15_networks):
    """The SD-size PASD denoiser as spec/PERFORMANCE.md counts it (1.41 and 99.0 TFLOP at 64 and
    256 latents), and `tile_cost`, fitted to that census, in proportion to the count."""
    at_64, at_256 = pass_flops(sd15_networks, 64), pass_flops(sd15_networks, 256)
    assert at_64 / 1e12 == pytest.approx(1.41, rel=0.05) and at_256 / 1e12 == pytest.approx(99.0, rel=0.05)
    for side in (128, 320):
        counted = pass_flops(sd15_networks, side) / at_64
        assert tiling.tile_cost(side, side) / tiling.tile_cost(64, 64) == pytest.approx(counted, rel=0.05), side


@pytest.mark.parametrize("output,most", [(2048, 0.4), (4096, 0.2)])
def test_auto_tiling_does_a_fraction_of_the_released_tilings_flops(sd15_networks, output, most):
    """Must-show 3: per denoising step, counted on the networks, for a square output."""
    side = output // 8
    plan = auto_tiling(side, side)
    auto = step_flops(sd15_networks, side, side, plan.tile, plan.overlap)
    released = step_flops(sd15_networks, side, side, RELEASED_LATENT_TILE, RELEASED_LATENT_OVERLAP)
    print(f"\n{output} px: auto {plan} {auto / 1e12:.1f} TFLOP, released {released / 1e12:.1f} TFLOP")
    assert auto <= most * released
