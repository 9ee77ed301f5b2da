"""Latent tiling: the released grid and weights, the released blend end to end, and the
speed-ups (batched tiles, cached DRM embeddings) that must not change what a tile computes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pasd_cli.engine.denoise import Guidance, NoisePredictor
from pasd_cli.engine.tiling import TileGrid, axis_ramps, needs_tiling, released_weights, tile_grid, tile_starts


def released_offsets(size: int, tile: int, overlap: int) -> list[int]:
    """The released pipeline's loop, transcribed: count tiles with `cur`, then place each one,
    the last flush with the far edge."""
    count, cur = 0, 0
    while cur < size:
        cur = max(count * tile - overlap * count, 0) + tile
        count += 1
    return [size - tile if k == count - 1 else max(k * tile - overlap * k, 0) for k in range(count)]


def released_gaussian(size: int) -> np.ndarray:
    """The released `_gaussian_weights`, transcribed (numpy, float64)."""
    var = 0.01
    mid_x = (size - 1) / 2
    x_probs = [
        math.exp(-(x - mid_x) * (x - mid_x) / (size * size) / (2 * var)) / math.sqrt(2 * math.pi * var)
        for x in range(size)
    ]
    mid_y = size / 2
    y_probs = [
        math.exp(-(y - mid_y) * (y - mid_y) / (size * size) / (2 * var)) / math.sqrt(2 * math.pi * var)
        for y in range(size)
    ]
    return np.outer(y_probs, x_probs)


@pytest.mark.parametrize("tile,overlap", [(320, 8), (96, 32), (64, 8), (16, 4), (8, 0)])
def test_released_positions_and_counts(tile, overlap):
    for size in range(tile, 4 * tile + 37):
        assert tile_starts(size, tile, overlap) == released_offsets(size, tile, overlap), size


def test_released_grid_examples():
    # 8K output, released defaults: a 1024-latent side in four tiles, the last one flush.
    assert tile_starts(1024, 320, 8) == [0, 312, 624, 704]
    # 4K: 512 -> two tiles overlapping by 128, not 8.
    assert tile_starts(512, 320, 8) == [0, 192]
    grid = tile_grid(100, 512, 320, 8)  # the square tile shrinks to the short side
    assert {t.size for t in grid} == {100} and len(grid) == 1 * 6
    assert [t.left for t in grid] == [0, 92, 184, 276, 368, 412]


def test_released_area_rule():
    assert not needs_tiling(400, 200, 320)  # 80000 <= 102400: untiled though 400 > 320
    assert needs_tiling(400, 260, 320)


@pytest.mark.parametrize("size", [7, 8, 15, 64, 320])
def test_released_weights_match_transcription(size):
    ours = released_weights(size)
    assert ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), released_gaussian(size), rtol=1e-6)


def test_released_weights_asymmetric_centres():
    w = released_weights(64).double()
    # x: symmetric about (T-1)/2; y: symmetric about T/2, so row 0 has no mirror and row 1 mirrors row 63.
    assert torch.allclose(w, w.flip(1))
    assert torch.allclose(w[1:], w[1:].flip(0))
    assert not torch.allclose(w, w.flip(0))
    assert w[:, 31].argmax() == 32 and w[32].argmax() in (31, 32)


def test_ramp_cross_fades_over_the_whole_overlap():
    starts = tile_starts(100, 64, 8)  # [0, 36]: the last tile overlaps by 28, not 8
    first, last = axis_ramps(starts, 64)
    band = slice(36, 64)
    # In the shared band the two weights sum to one and cross-fade monotonically.
    torch.testing.assert_close(first[band] + last[:28], torch.ones(28))
    assert (first[band].diff() < 0).all() and (last[:28].diff() > 0).all()
    # Outside it, each tile has full weight; at the image border no ramp.
    assert torch.all(first[:36] == 1) and torch.all(last[28:] == 1)
    assert first[0] == 1 and last[-1] == 1


def test_ramp_weights_are_positive_and_vanish_at_inner_edges():
    grid = TileGrid.build(90, 130, 40, 10)
    total = torch.zeros(90, 130)
    for tile in grid.tiles:
        weight = grid.weight(tile, "ramp")
        assert weight.min() > 0
        total[tile.slices()] += weight
        if tile.left > 0:
            assert weight[:, 0].max() < 0.01  # fades in from next to nothing
    torch.testing.assert_close(total, torch.ones_like(total))


# -- the networks ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def networks(tiny_pipeline):
    return tiny_pipeline.unet, tiny_pipeline.controlnet


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 4, 22, 30, generator=g)
    hint = torch.randint(0, 256, (1, 3, 22 * 8, 30 * 8), generator=g, dtype=torch.uint8)
    embeds = torch.randn(2, 77, 32, generator=g)
    return latents, hint, embeds, torch.tensor(500)


def released_tiled_eps(unet, controlnet, latents, t, embeds, hint, guidance, tile, overlap):
    """The released tiled branch, transcribed: the CFG pair in one batch per tile, the raw hint
    crop through the ControlNet each time, float64 Gaussian weights, guidance after blending."""
    latent_input = torch.cat([latents] * 2)
    image = torch.cat([hint.float() / 255.0] * 2)
    _, _, h, w = latent_input.shape
    tile = min(tile, min(h, w))
    weights = torch.tensor(released_gaussian(tile))
    grid_rows = len(released_offsets(w, tile, overlap))
    grid_cols = len(released_offsets(h, tile, overlap))
    noise_pred = torch.zeros(latent_input.shape)
    contributors = torch.zeros(latent_input.shape)
    for row in range(grid_rows):
        for col in range(grid_cols):
            ofs_x = max(row * tile - overlap * row, 0)
            ofs_y = max(col * tile - overlap * col, 0)
            if row == grid_rows - 1:
                ofs_x = w - tile
            if col == grid_cols - 1:
                ofs_y = h - tile
            window = (slice(None), slice(None), slice(ofs_y, ofs_y + tile), slice(ofs_x, ofs_x + tile))
            pixels = (
                slice(None),
                slice(None),
                slice(ofs_y * 8, (ofs_y + tile) * 8),
                slice(ofs_x * 8, (ofs_x + tile) * 8),
            )
            down, mid = controlnet(
                latent_input[window],
                t,
                encoder_hidden_states=embeds,
                controlnet_cond=image[pixels],
                conditioning_scale=1.0,
                return_dict=False,
            )
            out = unet(
                latent_input[window],
                t,
                embeds,
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
                return_dict=False,
            )[0]
            noise_pred[window] += out * weights
            contributors[window] += weights
    noise_pred /= contributors
    uncond, text = noise_pred.chunk(2)
    return uncond + guidance * (text - uncond)


@torch.inference_mode()
def test_released_tiled_mode_reproduces_the_released_blend(networks, inputs):
    unet, controlnet = networks
    latents, hint, embeds, t = inputs
    expected = released_tiled_eps(unet, controlnet, latents, t, embeds, hint, 9.0, 16, 4)
    predictor = NoisePredictor(unet, controlnet, embeds, hint, Guidance(9.0, 1.0), 16, 4, blend="gaussian")
    for _ in range(2):  # the second call uses the cached DRM embeddings
        torch.testing.assert_close(predictor(latents, t), expected, rtol=0, atol=1e-5 * expected.abs().max().item())


@torch.inference_mode()
@pytest.mark.parametrize("blend,guidance", [("gaussian", 9.0), ("ramp", 9.0), ("gaussian", 1.0)])
def test_batched_tiles_equal_one_at_a_time(networks, inputs, blend, guidance):
    """Within 1e-5 of the prediction's scale: batched matrix products round differently
    (measured: 2e-6 relative without guidance; guidance 9 amplifies the difference 9x)."""
    unet, controlnet = networks
    latents, hint, embeds, t = inputs
    embeds = embeds if guidance > 1 else embeds[1:]
    results = {}
    for batch in (1, 3, 6):
        predictor = NoisePredictor(
            unet, controlnet, embeds, hint, Guidance(guidance, 1.0), 16, 4, tile_batch=batch, blend=blend
        )
        results[batch] = predictor(latents, t)
    assert len(TileGrid.build(22, 30, 16, 4).tiles) == 6
    scale = max(1.0, results[1].abs().max().item())
    for batch in (3, 6):
        torch.testing.assert_close(results[batch], results[1], rtol=0, atol=1e-5 * scale)


@torch.inference_mode()
def test_hint_cache_is_bounded_and_exact(networks, inputs):
    unet, controlnet = networks
    latents, hint, embeds, t = inputs

    def make(budget):
        return NoisePredictor(
            unet,
            controlnet,
            embeds,
            hint,
            Guidance(9.0, 1.0),
            16,
            4,
            hint_cache_bytes=budget,
        )

    cached, uncached, two = make(2**30), make(0), make(2 * 16 * 16 * 16 * 4)
    for predictor in (cached, uncached, two):
        predictor(latents, t)
    assert len(cached._embedded) == 6 and len(uncached._embedded) == 0 and len(two._embedded) == 2
    torch.testing.assert_close(uncached(latents, t), cached(latents, t), rtol=0, atol=0)


@torch.inference_mode()
def test_blend_weights_go_to_the_device_once_per_image(networks, inputs, monkeypatch):
    """Not at every tile of every step: a copy from the CPU waits for the device's queued work."""
    unet, controlnet = networks
    latents, hint, embeds, t = inputs
    made = []
    weight = TileGrid.weight
    monkeypatch.setattr(TileGrid, "weight", lambda grid, tile, blend: made.append(tile) or weight(grid, tile, blend))
    predictor = NoisePredictor(unet, controlnet, embeds, hint, Guidance(9.0, 1.0), 16, 4, blend="ramp")
    first, second = predictor(latents, t), predictor(latents, t)
    assert len(made) == len(set(made)) == 6
    torch.testing.assert_close(second, first, rtol=0, atol=0)


@torch.inference_mode()
@pytest.mark.parametrize("blend", ["gaussian", "ramp"])
def test_batched_tiles_equal_one_at_a_time_in_float64_within_1e_5(networks, inputs, blend):
    """With the networks in float64 the rounding of batched matrix products vanishes: an absolute
    1e-5 holds even with guidance 9 (the blend still sums in float32), so batching changes
    nothing but rounding."""
    import copy

    unet, controlnet = (copy.deepcopy(net).double() for net in networks)
    latents, hint, embeds, t = inputs
    results = {}
    for batch in (1, 6):
        predictor = NoisePredictor(
            unet,
            controlnet,
            embeds.double(),
            hint,
            Guidance(9.0, 1.0),
            16,
            4,
            tile_batch=batch,
            blend=blend,
            dtype=torch.float64,
        )
        results[batch] = predictor(latents, t)
    torch.testing.assert_close(results[6], results[1], rtol=0, atol=1e-5)
