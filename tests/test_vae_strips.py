"""Row strips (engine.vae_strips) compute the stock VAE up to float rounding: one row per strip,
a few rows, one strip; odd sizes; a batch; an output narrower than its input written into the
input's memory. And they hold fewer whole-image tensors than the stock networks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_vaes import sd_structured_vae

from pasd_cli.engine import vae_strips
from pasd_cli.engine.vae import VaeCodec


@pytest.fixture(scope="module")
def codec():
    return VaeCodec(sd_structured_vae())


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


@torch.inference_mode()
@pytest.mark.parametrize("strip_bytes", [1, 4000, 1 << 30])  # one row; a few rows; the whole image
@pytest.mark.parametrize("size", [(200, 152), (203, 150)])
def test_strips_compute_the_stock_vae(codec, monkeypatch, strip_bytes, size):
    monkeypatch.setattr(vae_strips, "STRIP_BYTES", strip_bytes)
    monkeypatch.setattr(vae_strips, "MIN_STRIP_ROWS", 1)
    g = torch.Generator().manual_seed(5)
    image = torch.randint(0, 256, (1, 3, *size), generator=g, dtype=torch.uint8)
    mean, std = codec.encode_moments(image)
    strip_mean, strip_std = codec.encode_moments(image, strips=True)
    _close(strip_mean, mean)
    _close(strip_std, std)
    # One image (channels-last on the CPU, written into its own memory) and a batch of two (planes).
    _close(codec.decode(mean, strips=True), codec.decode(mean))
    latents = torch.cat([mean, std * torch.randn(mean.shape, generator=g)])
    _close(codec.decode(latents, strips=True), codec.decode(latents))


def test_every_layer_of_the_sd_structure_runs_in_strips(codec):
    """Otherwise the comparison above would compare the stock networks with themselves."""
    assert vae_strips.supports_encoder(codec.vae.encoder)
    assert vae_strips.supports_decoder(codec.vae.decoder)


# Measured in a child whose allocator maps every buffer of 1 MB or more on its own and unmaps it
# when freed: the command line's heap tuning (cli.runtime.limit_heap_fragmentation, 4 MB) at this
# test's scale, where whole-image tensors are 8 MB and strips 1 MB. Then RSS follows the live
# tensors, and the peak above the starting RSS is what a pass holds at once.
_CHILD = textwrap.dedent(
    """
    import json, sys, torch, psutil
    from diffusers import AutoencoderKL
    from pasd_cli.cli.runtime import peak_rss
    from pasd_cli.engine import vae_strips
    from pasd_cli.engine.vae import VaeCodec

    vae_strips.STRIP_BYTES = 1 << 20
    torch.manual_seed(0)
    # Full-resolution layers as wide as the deeper ones, so whole-image tensors dominate memory.
    codec = VaeCodec(AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
    ).eval())
    latents = torch.randn(1, 4, 128, 128)
    image = torch.randint(0, 256, (1, 3, 256, 256), dtype=torch.uint8)
    runs = {
        "decode": lambda: codec.decode(latents),
        "decode in strips": lambda: codec.decode(latents, strips=True),
        "encode": lambda: codec.encode_moments(image),
        "encode in strips": lambda: codec.encode_moments(image, strips=True),
    }
    peaks = {}
    with torch.inference_mode():
        for name, run in runs.items():
            run()  # first-use costs apart
            open("/proc/self/clear_refs", "w").write("5")  # the peak RSS starts again from here
            before = psutil.Process().memory_info().rss
            run()
            peaks[name] = peak_rss() - before
    print(json.dumps(peaks))
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's peak RSS reset")
def test_strips_hold_fewer_whole_image_tensors():
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    proc = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    peaks = json.loads(proc.stdout)
    tensor = 32 * 256 * 256 * 4  # one full-resolution activation
    print({name: round(peak / tensor, 2) for name, peak in peaks.items()})
    assert peaks["decode in strips"] < 0.6 * peaks["decode"]
    # The encoder's float input and its conversion's temporaries (3 channels each, up to 0.3 of a
    # 32-channel activation at once) weigh the same in both, so its ratio is closer to 1.
    assert peaks["encode in strips"] < 0.7 * peaks["encode"]


@torch.inference_mode()
def test_strips_keep_a_channels_last_layout(monkeypatch):
    """On CUDA the networks run channels-last (PASDPipeline.optimize): strips then allocate in
    that layout, and never write an output into its input's memory (unsafe in that layout)."""
    monkeypatch.setattr(vae_strips, "STRIP_BYTES", 4000)
    monkeypatch.setattr(vae_strips, "MIN_STRIP_ROWS", 1)
    codec = VaeCodec(sd_structured_vae().to(memory_format=torch.channels_last))
    g = torch.Generator().manual_seed(3)
    image = torch.randint(0, 256, (2, 3, 96, 80), generator=g, dtype=torch.uint8)
    mean, _ = codec.encode_moments(image)
    _close(codec.encode_moments(image, strips=True)[0], mean)
    decoded = codec.decode(mean, strips=True)
    _close(decoded, codec.decode(mean))
    assert decoded.is_contiguous(memory_format=torch.channels_last)


_NARROWING_CHILD = textwrap.dedent(
    """
    import json, torch, psutil
    from diffusers import AutoencoderKL
    from pasd_cli.cli.runtime import peak_rss
    from pasd_cli.engine import vae_strips
    from pasd_cli.engine.vae import VaeCodec

    vae_strips.STRIP_BYTES = 1 << 20
    vae_strips.MIN_STRIP_ROWS = 8
    torch.manual_seed(0)
    # As SD's decoder ends: blocks whose first resnet halves the channels, the one before last
    # with a 2x upsampler. No attention over the 256x256 latent, which would take minutes.
    codec = VaeCodec(AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4,
        mid_block_add_attention=False,
    ).eval())
    latents = torch.randn(1, 4, 256, 256)
    with torch.inference_mode():
        codec.decode(latents, strips=True)
        open("/proc/self/clear_refs", "w").write("5")
        before = psutil.Process().memory_info().rss
        codec.decode(latents, strips=True)
        print(json.dumps(peak_rss() - before))
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's peak RSS reset")
def test_narrowing_blocks_hold_little_more_than_the_upsampled_tensor():
    """The last upsampler's output (32 channels at 1024x1024) is the largest tensor. Its input
    (32 channels at 512x512) gets memory of its own size, a quarter of that tensor, not the
    64-channel memory its resnet wrote it into (half); the last block's first resnet writes its
    intermediate and output over the upsampled tensor, where an intermediate of its own would
    have added half of it. So about 1.25 of that tensor at the peak, not 1.5."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    child = [sys.executable, "-c", _NARROWING_CHILD]
    proc = subprocess.run(child, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    upsampled = 32 * 1024 * 1024 * 4
    ratio = json.loads(proc.stdout) / upsampled
    print(f"peak: {ratio:.2f} of the upsampled tensor")
    assert ratio < 1.4
