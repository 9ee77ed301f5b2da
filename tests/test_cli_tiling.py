"""Tiling through the real `pasd` command: chosen automatically, switched off by options, and the
same image either way (the VAE tiling is exact)."""

from __future__ import annotations

import json

import pytest
from conftest import LR_INPUT, pasd_here, tiny_model_args
from PIL import Image

from pasd_cli.engine.pipeline import image_to_tensor

# 100x60 -> 600x360 output, latent 75x45; one step, no guidance, to keep it quick.
BASE = [
    "--scale",
    "6",
    "--process-size",
    "64",
    "--steps",
    "1",
    "--guidance",
    "1",
    "--device",
    "cpu",
    "--dtype",
    "fp32",
    "--caption",
    "none",
    "--json",
]


def _upscale(tmp_path, name, *options):
    out = tmp_path / name
    proc = pasd_here("upscale", LR_INPUT, "-o", out, *tiny_model_args(), *BASE, *options)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.splitlines()[0])  # the image's record; the summary follows
    vae = f"{record['vae_tile']} px" if record["vae_tile"] else "untiled"
    return image_to_tensor(Image.open(out / "lr_input.png")), record["latent_tiles"], vae


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli-tiling")
    return {
        # The VAE's estimates for the 600x360 image: whole ~80 MB stock, ~40 MB in row strips
        # (what the defaults run); a 256-px tile ~68 MB (every larger tile covers the image). In
        # 35 MB nothing fits, so the smallest automatic tile is taken; in 75 MB the whole image
        # runs in strips, where stock passes would have tiled.
        "auto": _upscale(tmp, "auto", "--latent-tile", "32", "--vae-memory", "35"),
        "vae whole": _upscale(tmp, "whole", "--latent-tile", "32", "--vae-memory", "75"),
        "latent off": _upscale(tmp, "latent-off", "--latent-tile", "75", "--vae-tile", "0"),
    }


def test_tiling_is_chosen_automatically(runs):
    _, latent_tiles, vae = runs["auto"]
    assert latent_tiles == 6  # 32-latent tiles over 75x45: 3 across, 2 down
    assert vae == "256 px"


def test_row_strips_keep_the_vae_whole_in_less_memory(runs):
    assert runs["vae whole"][2] == "untiled"


def test_options_turn_tiling_off(runs):
    assert runs["latent off"][1:] == (1, "untiled")


def test_vae_tiling_does_not_change_the_image(runs):
    diff = (runs["auto"][0].int() - runs["vae whole"][0].int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.01
