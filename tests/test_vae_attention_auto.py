"""The automatic VAE attention window (`--vae-attention-window auto`): its FLOP model, checked
against torch's FlopCounterMode on the tiny VAE, the choice it makes, and how the engine and the
command line report it."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import LR_INPUT
from diffusers import AutoencoderKL
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from pasd_cli.cli.upscale import UpscaleCommand
from pasd_cli.engine import UpscaleSettings, exact_settings
from pasd_cli.engine.vae import VaeCodec
from pasd_cli.engine.vae_attention import (
    AUTO_WINDOW,
    auto_attention_window,
    conv_flops_per_latent_pixel,
    global_attention_flops,
)

SD15_VAE = {
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "norm_num_groups": 32,
}


def test_the_flop_model_is_what_the_tiny_vae_computes(tiny_pipeline):
    """Counted on the meta device: on the CPU, torch 2.13's counter does not count the fused
    attention kernel (aten._scaled_dot_product_flash_attention_for_cpu) at all."""
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(tiny_pipeline.vae.vae.config)
    codec = VaeCodec(vae)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        mean, _ = codec.encode_moments(torch.empty(1, 3, 256, 192, device="meta"))
        codec.decode(mean, 0)
    pixels = 32 * 24
    expected = conv_flops_per_latent_pixel(vae.config) * pixels + global_attention_flops(vae.config, pixels)
    assert counter.get_total_flops() == pytest.approx(expected, rel=0.001)


def test_sd15_sizes_match_the_census():
    """spec/PERFORMANCE.md: VAE encode + decode at 512 latents, 210 + 299 TFLOP."""
    config = AutoencoderKL.from_config(SD15_VAE).config
    pixels = 512 * 512
    total = conv_flops_per_latent_pixel(config) * pixels + global_attention_flops(config, pixels)
    assert total / 1e12 == pytest.approx(210 + 299, rel=0.03)


def test_a_window_only_on_the_cpu_where_global_attention_would_dominate(tiny_pipeline):
    tiny = tiny_pipeline.vae.vae.config
    sd15 = AutoencoderKL.from_config(SD15_VAE).config
    assert auto_attention_window(tiny, 96, 96, "cpu") == 0  # 768 px
    assert auto_attention_window(tiny, 128, 128, "cpu") == AUTO_WINDOW  # 1024 px
    assert auto_attention_window(sd15, 256, 256, "cpu") == 0  # 2048 px
    assert auto_attention_window(sd15, 512, 512, "cpu") == AUTO_WINDOW  # 4096 px
    assert auto_attention_window(sd15, 1024, 1024, "cuda") == auto_attention_window(sd15, 1024, 1024, "mps") == 0
    assert auto_attention_window(tiny, 20, 2000, "cpu") == AUTO_WINDOW  # area, not side, decides
    assert auto_attention_window(tiny, 33, 33, "cpu") == 0


def test_the_engine_chooses_by_image_size(tiny_pipeline):
    auto = UpscaleSettings()
    assert tiny_pipeline.vae_attention_window(auto, 1088, 1088) == AUTO_WINDOW
    assert tiny_pipeline.vae_attention_window(auto, 512, 768) == 0
    assert tiny_pipeline.vae_attention_window(exact_settings(auto), 1088, 1088) == 0
    assert tiny_pipeline.vae_attention_window(UpscaleSettings(vae_attention_window=5), 64, 64) == 5


def test_the_result_records_the_window(tiny_pipeline):
    settings = UpscaleSettings(steps=1, guidance=1.0, scale=2, process_size=64, vae_tile=0)
    lr = Image.open(LR_INPUT).convert("RGB")
    assert tiny_pipeline.upscale(lr, settings).vae_attention_window == 0
    assert tiny_pipeline.upscale(lr, replace(settings, vae_attention_window=3)).vae_attention_window == 3


@pytest.mark.slow
def test_a_large_image_gets_the_window_end_to_end(tiny_pipeline):
    settings = UpscaleSettings(steps=1, guidance=1.0, scale=8, process_size=64, vae_tile=0)
    lr = Image.open(LR_INPUT).convert("RGB").resize((136, 136))  # a 1088 px output
    chosen = tiny_pipeline.upscale(lr, settings)
    assert chosen.vae_attention_window == AUTO_WINDOW and chosen.image.size == (1088, 1088)


class Warnings:
    def __init__(self):
        self.said: list[str] = []

    def warn(self, text: str) -> None:
        self.said.append(text)


@pytest.mark.parametrize("window,told", [(None, 1), (16, 0)])
def test_the_command_line_says_so_once_and_records_it(window, told):
    command = UpscaleCommand.__new__(UpscaleCommand)
    command.settings = UpscaleSettings(vae_attention_window=window)
    command._reporter = reporter = Warnings()  # type: ignore[assignment]
    records = [command.attention_window(w) for w in (AUTO_WINDOW, 0, AUTO_WINDOW)]
    assert records == [{"vae_attention_window": AUTO_WINDOW}, {}, {"vae_attention_window": AUTO_WINDOW}]
    assert len(reporter.said) == told
    assert all("--vae-attention-window 0 keeps it exact" in text for text in reporter.said)
