"""Speed options that keep the result: channels_last layout (used on CUDA) and `--compile`
(torch.compile of the UNet and ControlNet), wired from the command line to the networks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import LR_INPUT, TINY_BASE, TINY_PASD, run_pasd, tiny_model_args
from PIL import Image

from pasd_cli.engine import UpscaleSettings
from pasd_cli.engine.pipeline import PASDPipeline
from pasd_cli.imageio.metadata import read_record

SETTINGS = UpscaleSettings(process_size=64, scale=2, steps=2, seed=5)
RUN = ["--process-size", "64", "--scale", "2", "--steps", "2", "--seed", "5", "--caption", "none", "--device", "cpu"]


def _pixels(pipeline) -> np.ndarray:
    return np.asarray(pipeline.upscale(Image.open(LR_INPUT), SETTINGS).image).astype(np.int16)


def test_channels_last_networks_give_the_same_image():
    plain = PASDPipeline.from_folders(TINY_PASD, TINY_BASE, torch.device("cpu"), torch.float32)
    nhwc = PASDPipeline.from_folders(TINY_PASD, TINY_BASE, torch.device("cpu"), torch.float32)
    nhwc.optimize(channels_last=True)
    conv = nhwc.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert nhwc.vae.vae.decoder.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    diff = np.abs(_pixels(plain) - _pixels(nhwc))
    assert diff.max() <= 1, diff.max()  # float rounding of other kernels, at most one level


def test_compile_compiles_the_unet_and_controlnet_in_place():
    pipeline = PASDPipeline.from_folders(TINY_PASD, TINY_BASE, torch.device("cpu"), torch.float32)
    unet_class = type(pipeline.unet)
    pipeline.optimize(compile=True)
    assert type(pipeline.unet) is unet_class  # attributes (config, dtype) stay reachable
    assert pipeline.unet._compiled_call_impl is not None and pipeline.controlnet._compiled_call_impl is not None
    assert pipeline.vae.vae._compiled_call_impl is None


def test_compile_is_an_option_of_the_image_commands(tmp_path):
    plan = run_pasd("upscale", LR_INPUT, "-o", tmp_path, "--compile", "--dry-run", "--json")
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout.splitlines()[0])["status"] == "planned"


@pytest.mark.slow  # compiling on the CPU takes minutes
def test_compile_through_the_command_gives_the_same_image(tmp_path):
    out = tmp_path / "out"
    proc = run_pasd("upscale", LR_INPUT, "-o", out, *tiny_model_args(), *RUN, "--compile", timeout=1800)
    assert proc.returncode == 0, proc.stderr
    with Image.open(out / "lr_input.png") as image:
        assert read_record(image)["model"]["compiled"] is True
        compiled = np.asarray(image.convert("RGB")).astype(np.int16)
    plain = _pixels(PASDPipeline.from_folders(TINY_PASD, TINY_BASE, torch.device("cpu"), torch.float32))
    assert np.abs(compiled - plain).max() <= 2
