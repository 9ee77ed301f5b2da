"""The VAE beside bfloat16 networks: upcast to float32, as beside float16 (bfloat16 does not
overflow, but its 8-bit mantissa moves decoded pixels). Measured on the tiny model, decoding the
same latents (the test image's at 256x424): the VAE in bfloat16 is 0.48 levels from float32 on
average, 17 at most; upcast, it is float32 itself (0 levels)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import LR_INPUT, TINY_BASE, TINY_PASD
from PIL import Image

from pasd_cli.engine.loading import load_components
from pasd_cli.engine.pipeline import PASDPipeline, decoded_to_uint8, image_to_tensor
from pasd_cli.engine.resize import make_hint
from pasd_cli.engine.vae import VaeCodec


@pytest.fixture(scope="module")
def latents_and_fp32_vae():
    components = load_components(TINY_PASD, TINY_BASE)
    hint = image_to_tensor(make_hint(Image.open(LR_INPUT).convert("RGB"), 4, 256)).unsqueeze(0)
    vae = VaeCodec(components.vae)
    with torch.inference_mode():
        mean, _ = vae.encode_moments(hint)
    return mean, components.vae


def _decoded_levels(vae, latents) -> torch.Tensor:
    with torch.inference_mode():
        return decoded_to_uint8(VaeCodec(vae).decode(latents)).int()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_networks_keep_the_vae_in_float32(dtype):
    components = load_components(TINY_PASD, TINY_BASE, dtype)
    assert components.vae.dtype == torch.float32
    pipeline = PASDPipeline(components, torch.device("cpu"), dtype)
    assert pipeline.unet.dtype == dtype and pipeline.vae.vae.dtype == torch.float32
    pipeline.use_dtype(torch.float32)
    pipeline.use_dtype(dtype)  # the overflow retry's casts keep the rule
    assert pipeline.vae.vae.dtype == torch.float32


def test_bf16_vae_deviation_before_and_after_the_upcast(latents_and_fp32_vae):
    latents, vae32 = latents_and_fp32_vae
    reference = _decoded_levels(vae32, latents)
    before = (_decoded_levels(copy.deepcopy(vae32).to(torch.bfloat16), latents) - reference).abs().float()
    # Before: the VAE in bfloat16 (the old rule). Measured 0.48 mean, 17 max.
    assert 0.1 < before.mean() < 2 and before.max() >= 8, (before.mean(), before.max())
    upcast = load_components(TINY_PASD, TINY_BASE, torch.bfloat16).vae
    after = (_decoded_levels(upcast, latents) - reference).abs()
    assert after.max() == 0


def test_bf16_vae_runs_beside_bf16_networks_only(latents_and_fp32_vae):
    """The fast modes' choice: the VAE in bfloat16 beside bfloat16 networks (read straight into
    it), the bfloat16 cast of the float32 VAE; beside float16 networks, where it would overflow,
    and after an overflow retry's casts, the rule still holds."""
    latents, vae32 = latents_and_fp32_vae
    components = load_components(TINY_PASD, TINY_BASE, torch.bfloat16, bf16_vae=True)
    assert components.vae.dtype == torch.bfloat16
    pipeline = PASDPipeline(components, torch.device("cpu"), torch.bfloat16)
    assert pipeline.vae.vae.dtype == torch.bfloat16
    cast = _decoded_levels(copy.deepcopy(vae32).to(torch.bfloat16), latents)
    assert torch.equal(_decoded_levels(pipeline.vae.vae, latents), cast)
    pipeline.use_dtype(torch.float16)
    assert pipeline.vae.vae.dtype == torch.float32
    pipeline.use_dtype(torch.bfloat16)
    assert pipeline.vae.vae.dtype == torch.bfloat16
    half = load_components(TINY_PASD, TINY_BASE, torch.float16, bf16_vae=True)
    assert half.vae.dtype == torch.float32
