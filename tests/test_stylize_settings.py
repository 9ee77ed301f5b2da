"""Stylize defaults (the authors' advice) and `--lora FILE[:WEIGHT]` parsing."""

from __future__ import annotations

import dataclasses

import pytest

from pasd_cli.engine import LoraSpec, StylizeSettings, UpscaleSettings
from pasd_cli.store import STYLIZE_PASD


def test_stylize_defaults_are_the_authors_advice_and_the_rest_is_upscale():
    stylize, upscale = StylizeSettings(), UpscaleSettings()
    assert (stylize.conditioning_scale, stylize.scale, STYLIZE_PASD) == (0.7, 1.0, "pasd-light")
    differing = {
        f.name for f in dataclasses.fields(UpscaleSettings) if getattr(stylize, f.name) != getattr(upscale, f.name)
    }
    assert differing == {"conditioning_scale", "scale"}
    with pytest.raises(ValueError):
        StylizeSettings(conditioning_scale=-1)


@pytest.mark.parametrize(
    "text,path,weight",
    [
        ("style.safetensors", "style.safetensors", 1.0),
        ("style.safetensors:0.6", "style.safetensors", 0.6),
        ("style.safetensors:-1", "style.safetensors", -1.0),
        ("dir/a:b.safetensors", "dir/a:b.safetensors", 1.0),
        (r"C:\loras\style.safetensors", r"C:\loras\style.safetensors", 1.0),
        (r"C:\loras\style.safetensors:0.8", r"C:\loras\style.safetensors", 0.8),
        ("style.safetensors:", "style.safetensors:", 1.0),
    ],
)
def test_lora_spec_parsing(text, path, weight):
    assert LoraSpec.parse(text, exists=lambda _: False) == LoraSpec(path, weight)


def test_existing_file_whose_name_ends_in_a_number_is_a_path(tmp_path):
    odd = tmp_path / "style:2"
    odd.write_bytes(b"")
    assert LoraSpec.parse(str(odd)) == LoraSpec(str(odd), 1.0)


@pytest.mark.parametrize("text", ["style.safetensors:nan", "style.safetensors:inf"])
def test_non_finite_weight_is_refused(text):
    with pytest.raises(ValueError, match="finite"):
        LoraSpec.parse(text, exists=lambda _: False)
