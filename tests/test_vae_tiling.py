"""The tiled VAE computes the untiled function: exact pooled GroupNorm statistics, halos wide
enough for every convolution, whole-latent middle block. Per-tile statistics (what other tiled
VAEs do) are shown to fail the same comparison, so the comparison can fail."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import LR_INPUT, TINY_BASE
from diffusers import AutoencoderKL
from PIL import Image
from tiny_vaes import sd_structured_vae

from pasd_cli.engine.vae import VaeCodec, choose_vae_tile, vae_peak_bytes
from pasd_cli.engine.vae_attention import SpatialSelfAttnProcessor
from pasd_cli.engine.vae_tiling import TiledSection, plan_sections


@pytest.fixture(scope="module")
def tiny_codec():
    vae = AutoencoderKL.from_pretrained(TINY_BASE / "vae").eval()
    return VaeCodec(vae)


def image_640x960() -> torch.Tensor:
    """The reference LR image enlarged to 640 wide, 960 high: real structure, uint8."""
    image = Image.open(LR_INPUT).convert("RGB").resize((640, 960), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None]


def border_jump_ratio(image: torch.Tensor, cuts: list[int]) -> float:
    """Mean |difference| between neighbouring columns across the given column cuts, over the
    same measure elsewhere (away from the image edges)."""
    steps = (image[..., 1:] - image[..., :-1]).abs().mean(dim=(0, 1, 2))
    at = torch.tensor([c - 1 for c in cuts if 0 < c < image.shape[-1]])
    mask = torch.ones_like(steps, dtype=torch.bool)
    mask[at] = False
    mask[:8] = mask[-8:] = False
    return (steps[at].mean() / steps[mask].mean()).item()


@torch.inference_mode()
def test_tiled_vae_equals_untiled_640x960(tiny_codec):
    """Must-show 1: tiles of 256 px, fp32; <= 1e-3 max abs in [-1, 1] units. Per-tile statistics
    on the same tiles miss by orders of magnitude and leave a step at the tile borders."""
    image = image_640x960()
    mean, std = tiny_codec.encode_moments(image)
    decoded = tiny_codec.decode(mean)

    # Decoder tile borders: columns 216 and 424 of 640, rows 240, 480 and 720 of 960.
    def seams(x):
        return (
            border_jump_ratio(x, [216, 424]),
            border_jump_ratio(x.transpose(-1, -2), [240, 480, 720]),
        )

    untiled_seams = seams(decoded)
    numbers = {}
    for exact in (True, False):
        tiled_mean, tiled_std = tiny_codec.encode_moments(image, tile=256, exact=exact)
        tiled_decoded = tiny_codec.decode(mean, tile=256, exact=exact)
        relative_seams = [tiled / untiled for tiled, untiled in zip(seams(tiled_decoded), untiled_seams)]
        numbers[exact] = (
            (tiled_mean - mean).abs().max().item(),
            (tiled_std - std).abs().max().item(),
            (tiled_decoded - decoded).abs().max().item(),
            *relative_seams,
        )
    print("\nmax abs diff of mean, std, decoded; jump across tile borders (columns, rows) relative to untiled")
    print("  pooled statistics:   ", numbers[True])
    print("  per-tile statistics: ", numbers[False])
    assert max(numbers[True][:3]) <= 1e-3
    assert all(abs(ratio - 1) < 0.01 for ratio in numbers[True][3:])
    assert min(numbers[False][:3]) > 0.05
    assert min(numbers[False][3:]) > 1.5


@torch.inference_mode()
def test_tile_cores_partition_the_image():
    section = TiledSection(lambda x: x, [], align=8)
    cores = section.cores(960, 640, 256)
    assert len(cores) == 4 * 3
    covered = torch.zeros(960, 640, dtype=torch.int32)
    for top, left, height, width in cores:
        assert top % 8 == left % 8 == height % 8 == width % 8 == 0 and height <= 256 and width <= 256
        covered[top : top + height, left : left + width] += 1
    assert torch.all(covered == 1)


@torch.inference_mode()
@pytest.mark.parametrize("tile,checkpoints", [(64, 0), (72, 0), (64, 10**9)])
def test_sd_structure_tiles_exactly(tile, checkpoints):
    codec = VaeCodec(sd_structured_vae())
    g = torch.Generator().manual_seed(5)
    image = torch.randint(0, 256, (1, 3, 200, 152), generator=g, dtype=torch.uint8)
    mean, std = codec.encode_moments(image)
    tiled_mean, tiled_std = codec.encode_moments(image, tile=tile, checkpoint_bytes=checkpoints)
    torch.testing.assert_close(tiled_mean, mean, rtol=0, atol=1e-4 * mean.abs().max().item())
    torch.testing.assert_close(tiled_std, std, rtol=0, atol=1e-4 * std.abs().max().item())
    decoded = codec.decode(mean)
    tiled = codec.decode(mean, tile=tile, checkpoint_bytes=checkpoints)
    torch.testing.assert_close(tiled, decoded, rtol=0, atol=1e-4 * decoded.abs().max().item())


def test_checkpoints_are_cut_where_they_fit(tiny_codec):
    stages = tiny_codec._decoder_stages()  # outputs: 32 ch at 1x, 32 at 2x, 16 at 4x, image at 8x
    size = (100, 100)

    def one(channels, scale):
        return channels * (100 * scale) ** 2 * 4

    assert [len(s) for s in plan_sections(stages, size, 4, 0)] == [4]
    assert [len(s) for s in plan_sections(stages, size, 4, one(32, 1) + one(32, 2))] == [1, 1, 2]
    assert [len(s) for s in plan_sections(stages, size, 4, 10**12)] == [1, 1, 1, 1]


def test_automatic_vae_tile(tiny_codec):
    config = tiny_codec.vae.config
    assert choose_vae_tile(config, 1024, 1024, 4, 2**40) == 0
    small = choose_vae_tile(config, 8192, 8192, 4, 2**30)
    assert 0 < small <= 2048
    assert vae_peak_bytes(config, 8192, 8192, 4, small) <= 2**30
    assert choose_vae_tile(config, 8192, 8192, 4, 2**28) < small


# -- the middle block's attention -----------------------------------------------------------------


@pytest.fixture(scope="module")
def attention():
    vae = AutoencoderKL.from_pretrained(TINY_BASE / "vae").eval()
    return vae.decoder.mid_block.attentions[0]


def _with(attention, processor, x):
    saved = attention.processor
    attention.set_processor(processor)
    try:
        return attention(x)
    finally:
        attention.set_processor(saved)


@torch.inference_mode()
def test_global_attention_equals_diffusers(attention):
    from diffusers.models.attention_processor import AttnProcessor2_0

    x = torch.randn(1, 32, 13, 21, generator=torch.Generator().manual_seed(0))
    stock = _with(attention, AttnProcessor2_0(), x)
    torch.testing.assert_close(_with(attention, SpatialSelfAttnProcessor(), x), stock, rtol=1e-5, atol=1e-5)
    # Query chunks (forced small) change nothing.
    torch.testing.assert_close(
        _with(attention, SpatialSelfAttnProcessor(max_scores=273 * 10), x), stock, rtol=1e-5, atol=1e-5
    )
    # A window as wide as the latent is global attention.
    torch.testing.assert_close(_with(attention, SpatialSelfAttnProcessor(window=21), x), stock, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_windowed_attention_matches_a_dense_mask(attention):
    """Each pixel attends to the pixels within `window` (Chebyshev distance) of itself."""
    x = torch.randn(1, 32, 45, 70, generator=torch.Generator().manual_seed(1))
    window = 6
    ours = _with(attention, SpatialSelfAttnProcessor(window=window), x)
    rows, cols = torch.meshgrid(torch.arange(45), torch.arange(70), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    near = ((rows[:, None] - rows[None, :]).abs() <= window) & ((cols[:, None] - cols[None, :]).abs() <= window)
    normed = attention.group_norm(x).flatten(2).transpose(1, 2)
    q, k, v = attention.to_q(normed), attention.to_k(normed), attention.to_v(normed)
    scores = (q @ k.transpose(1, 2)) / q.shape[-1] ** 0.5
    weights = scores.masked_fill(~near, float("-inf")).softmax(-1)
    dense = attention.to_out[0](weights @ v).transpose(1, 2).reshape(x.shape) + x
    torch.testing.assert_close(ours, dense, rtol=1e-4, atol=1e-4)
    assert (ours - _with(attention, SpatialSelfAttnProcessor(), x)).abs().max() > 1e-3


def test_row_strips_let_larger_images_run_untiled(tiny_codec):
    """Untiled in row strips, a pass holds about half the whole-image tensors (test_vae_strips):
    a budget that makes the stock networks tile lets strips run the image whole."""
    config = tiny_codec.vae.config
    budget = vae_peak_bytes(config, 4096, 4096, 4, 0, strips=True)
    assert budget < vae_peak_bytes(config, 4096, 4096, 4, 0)
    assert choose_vae_tile(config, 4096, 4096, 4, budget, strips=True) == 0
    assert choose_vae_tile(config, 4096, 4096, 4, budget) > 0
    # Tiled passes run stock whatever the flag.
    assert vae_peak_bytes(config, 4096, 4096, 4, 1024, strips=True) == vae_peak_bytes(config, 4096, 4096, 4, 1024)
