"""Per-tensor device limits: the tile arithmetic for CUDA's 32-bit indexing and MPS's buffer
limits, and the latent tile that keeps every attention score matrix inside one MPS buffer,
checked on the tiny model by measuring the attention each module really computes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import LR_INPUT
from diffusers.models.attention_processor import Attention
from PIL import Image

from pasd_cli.engine.limits import (
    INT32_ELEMENTS,
    MPS_MAX_BYTES,
    DeviceLimits,
    attention_heads,
    device_limits,
    latent_tile_cap,
    vae_elements_per_pixel,
)
from pasd_cli.engine.settings import UpscaleSettings
from pasd_cli.engine.vae import _tile_pixels, cap_vae_tile, choose_vae_tile, vae_tile_fits

SD_VAE = SimpleNamespace(block_out_channels=[128, 256, 512, 512], in_channels=3, out_channels=3)
CUDA, MPS, CPU = device_limits("cuda"), device_limits("mps"), device_limits("cpu")
UNLIMITED_BUDGET = 2**50


def test_device_limits():
    assert CPU == DeviceLimits() and CPU.max_tensor_elements(4) is None and CPU.fits(2**40, 4)
    assert CUDA.max_tensor_elements(4) == CUDA.max_tensor_elements(2) == INT32_ELEMENTS
    assert not CUDA.attention_materialised
    # MPS: 2^32 bytes binds float32 (2^30 elements), the 32-bit element count binds float16.
    assert MPS.max_tensor_elements(4) == MPS_MAX_BYTES // 4 == 2**30
    assert MPS.max_tensor_elements(2) == INT32_ELEMENTS
    assert MPS.max_tensor_bytes(4) == 2**32 and MPS.attention_materialised
    assert MPS.fits(2**30, 4) and not MPS.fits(2**30 + 1, 4)


def test_the_sd_decoders_256_channel_full_resolution_activation_is_the_largest():
    assert vae_elements_per_pixel(SD_VAE) == 256
    tiny = SimpleNamespace(block_out_channels=[16, 16, 32, 32], in_channels=3, out_channels=3)
    assert vae_elements_per_pixel(tiny) == 16


def test_vae_tiles_on_cuda_stay_under_2_31_elements():
    """A 4096 px image untiled holds 256 x 4096^2 = 2^32 elements: past 32-bit indexing however
    large the GPU (the budget here is unlimited), so a tile is chosen: 2048 px plus its 128-px
    halo on each side is 256 x 2304^2 = 1.36e9 elements; 3072 px would be 2.7e9."""
    assert choose_vae_tile(SD_VAE, 4096, 4096, 4, UNLIMITED_BUDGET) == 0  # by total bytes alone
    assert not vae_tile_fits(SD_VAE, 4096, 4096, 4, CUDA)
    assert choose_vae_tile(SD_VAE, 4096, 4096, 4, UNLIMITED_BUDGET, CUDA) == 2048
    assert 256 * _tile_pixels(SD_VAE, 4096, 4096, 2048) < 2**31 < 256 * _tile_pixels(SD_VAE, 4096, 4096, 3072)
    # Smaller images need no tile; the memory budget still decides where it is the tighter bound.
    assert choose_vae_tile(SD_VAE, 2048, 2048, 4, UNLIMITED_BUDGET, CUDA) == 0
    assert choose_vae_tile(SD_VAE, 4096, 4096, 4, 2**30, CUDA) == choose_vae_tile(SD_VAE, 4096, 4096, 4, 2**30)


def test_vae_tiles_on_mps_stay_under_2_32_bytes():
    """float32: a 2560 px image untiled holds 256 x 2560^2 x 4 = 6.7e9 bytes in one tensor; the
    tile is 1536 (1792^2 x 256 x 4 = 3.3e9 bytes; 2048 px would be 2304^2 x 1024 = 5.4e9).
    float16 halves the bytes, so 2560 px fits whole (1.7e9 elements, under 2^31)."""
    assert not vae_tile_fits(SD_VAE, 2560, 2560, 4, MPS)
    assert choose_vae_tile(SD_VAE, 2560, 2560, 4, UNLIMITED_BUDGET, MPS) == 1536
    assert 256 * _tile_pixels(SD_VAE, 2560, 2560, 1536) * 4 <= 2**32 < 256 * _tile_pixels(SD_VAE, 2560, 2560, 2048) * 4
    assert choose_vae_tile(SD_VAE, 2560, 2560, 2, UNLIMITED_BUDGET, MPS) == 0
    assert choose_vae_tile(SD_VAE, 4096, 4096, 2, UNLIMITED_BUDGET, MPS) == 2048


def test_a_requested_vae_tile_is_only_ever_made_smaller():
    assert cap_vae_tile(SD_VAE, 4096, 4096, 4, CUDA, 0) == 2048  # untiled asked for: too large
    assert cap_vae_tile(SD_VAE, 4096, 4096, 4, CUDA, 3072) == 2048
    assert cap_vae_tile(SD_VAE, 4096, 4096, 4, CUDA, 512) == 512
    assert cap_vae_tile(SD_VAE, 4096, 4096, 4, CPU, 0) == 0


def test_latent_tile_cap_keeps_the_attention_scores_in_one_mps_buffer():
    """T^4 x batch x heads float32 scores <= 2^30: with guidance (batch 2) and SD's 8 heads,
    T <= 90.5, so 88 (a multiple of 8); without guidance 104; the released 320 would hold
    1.7e11 scores."""
    assert attention_heads(SimpleNamespace(num_attention_heads=None, attention_head_dim=8)) == 8
    assert attention_heads(SimpleNamespace(num_attention_heads=[5, 10, 20, 20], attention_head_dim=64)) == 20
    assert latent_tile_cap(MPS, heads=8, batch=2) == 88
    assert 88**4 * 16 <= 2**30 < 96**4 * 16
    assert latent_tile_cap(MPS, heads=8, batch=1) == 104
    assert latent_tile_cap(MPS, heads=8, batch=4) == 72  # two tiles batched
    assert 320**4 * 16 > 100 * 2**30
    assert latent_tile_cap(CUDA, 8, 2) is None and latent_tile_cap(CPU, 8, 2) is None


class _LargestScores:
    """Forward pre-hooks on every attention module: the largest score matrix (batch x heads x
    queries x keys) any of them computed."""

    def __init__(self, *models):
        self.largest = 0
        self.hooks = [
            module.register_forward_pre_hook(self, with_kwargs=True)
            for model in models
            for module in model.modules()
            if isinstance(module, Attention)
        ]

    def __call__(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states")
        keys = (context if context is not None else hidden).shape[1]
        self.largest = max(self.largest, hidden.shape[0] * module.heads * hidden.shape[1] * keys)

    def remove(self):
        for hook in self.hooks:
            hook.remove()


@pytest.mark.parametrize("variant", ["full", "light"])
def test_with_materialised_attention_no_score_matrix_passes_the_limit(variant, tiny_pipeline, request):
    """An MPS-like device whose buffers hold 6e6 scores: the latent tile drops from the requested
    64 to 24 (24^4 x 2 x 8 = 5.3e6) and every attention the UNet, the ControlNet and PACA
    compute stays below it; the same run with no limit computes 16 x 1500^2 = 3.6e7."""
    pipeline = tiny_pipeline if variant == "full" else request.getfixturevalue("tiny_light_pipeline")
    settings = UpscaleSettings(
        steps=1, guidance=9.0, scale=4, process_size=112, latent_tile=64, latent_overlap=4, vae_tile=0
    )
    lr = Image.open(LR_INPUT)  # 400x240 hint: a 50x30 latent, one tile of 64
    limits = DeviceLimits(max_elements=6 * 10**6, attention_materialised=True)
    assert latent_tile_cap(limits, attention_heads(pipeline.unet.config), 2) == 24
    scores = _LargestScores(pipeline.unet, pipeline.controlnet)
    try:
        pipeline.upscale(lr, settings)
        unlimited = scores.largest
        scores.largest = 0
        pipeline.limits = limits
        result = pipeline.upscale(lr, settings)
    finally:
        pipeline.limits = device_limits(pipeline.device)
        scores.remove()
    assert unlimited == 2 * 8 * 1500**2 > limits.max_elements
    assert 0 < scores.largest <= limits.max_elements
    assert result.latent_tiles > 1


@pytest.fixture(scope="module")
def tiny_light_pipeline():
    from conftest import TINY_BASE, TINY_LIGHT

    from pasd_cli.engine.pipeline import PASDPipeline

    return PASDPipeline.from_folders(TINY_LIGHT, TINY_BASE, torch.device("cpu"), torch.float32)


def test_vae_checkpoints_store_no_tensor_past_the_limit(tiny_pipeline):
    """Whole-image activations kept between VAE blocks are single tensors too."""
    vae = tiny_pipeline.vae.vae
    tiny_pipeline.memory_budget = UNLIMITED_BUDGET
    try:
        assert tiny_pipeline.vae_checkpoint_bytes(256, 4096, 4096) > 2**32
        tiny_pipeline.limits = DeviceLimits(max_bytes=2**20)
        assert tiny_pipeline.vae_checkpoint_bytes(256, 4096, 4096) == 2**20
        assert vae.dtype == torch.float32
    finally:
        tiny_pipeline.memory_budget = None
        tiny_pipeline.limits = device_limits("cpu")
