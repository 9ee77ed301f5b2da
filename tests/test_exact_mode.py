"""Exact mode and the defaults it departs from: the settings' automatic fields, the --exact
switch of the image commands, and --dtype auto on the CPU. (The parity tests run through
exact mode: tests/test_parity_*.py, tests/test_colorize_parity.py, tests/test_cli_engine.py.)"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import LR_INPUT, pasd_here, tiny_model_args

from pasd_cli.cli.diffusion import exact_precision
from pasd_cli.cli.options import ModelChoice, colorize_settings_options, diffusion_options
from pasd_cli.cli.runtime import cpu_flags, cpu_has_bf16_matrix, pick_dtype
from pasd_cli.engine import EXACT_DTYPE, ColorizeSettings, StylizeSettings, UpscaleSettings, exact_settings
from pasd_cli.errors import UsageError

RELEASED = {"latent_tile": 320, "latent_overlap": 8, "blend": "gaussian", "vae_attention_window": 0}


@pytest.mark.parametrize("settings_class", [UpscaleSettings, StylizeSettings, ColorizeSettings])
def test_exact_settings_take_the_released_values_where_automatic(settings_class):
    exact = exact_settings(settings_class())
    assert isinstance(exact, settings_class) and exact.exact
    assert {name: getattr(exact, name) for name in RELEASED} == RELEASED
    assert exact.latent_blend == "gaussian" and exact.caption_separator == ""
    assert EXACT_DTYPE == str(torch.float32).removeprefix("torch.")
    # The defaults leave them to the engine, and blend with the ramp.
    default = settings_class()
    assert default.latent_tile is None and default.latent_overlap is None and default.blend is None
    assert default.latent_blend == "ramp" and default.caption_separator == ", "


def test_exact_mode_keeps_what_is_given():
    exact = UpscaleSettings(exact=True, latent_tile=96, blend="ramp")
    assert (exact.latent_tile, exact.latent_overlap, exact.blend) == (96, 8, "ramp")
    with pytest.raises(ValueError, match="latent overlap must be in"):
        UpscaleSettings(exact=True, latent_tile=8)  # the released overlap of 8 needs a larger tile
    with pytest.raises(ValueError, match="latent overlap must be in"):
        UpscaleSettings(latent_tile=8)  # so does a given tile outside exact mode
    with pytest.raises(ValueError, match="latent overlap must be in"):
        UpscaleSettings(latent_overlap=64)  # an automatic tile is at least 64


def _built(group, **given):
    """What a group of options builds from its defaults and `given` (as Typer would call it)."""
    values = {p.name: p.declaration.default for p in group.params}
    return group.build(**{**values, **given})


@pytest.mark.parametrize(
    "group", [diffusion_options(UpscaleSettings()), diffusion_options(StylizeSettings()), colorize_settings_options()]
)
def test_the_exact_switch_of_every_image_command(group):
    default = _built(group)
    assert not default.exact and default.latent_tile is None and default.blend is None
    exact = _built(group, exact=True)
    assert exact.exact and {name: getattr(exact, name) for name in RELEASED} == RELEASED
    assert _built(group, latent_tile="96", latent_overlap="auto").latent_tile == 96
    with pytest.raises(UsageError, match="--latent-tile big: must be a whole number or auto"):
        _built(group, latent_tile="big")


def test_exact_mode_computes_in_fp32():
    models = ModelChoice("pasd", "base")
    assert exact_precision(UpscaleSettings(exact=True), models).dtype == "fp32"
    assert exact_precision(UpscaleSettings(exact=True), replace(models, dtype="fp32")).dtype == "fp32"
    assert exact_precision(UpscaleSettings(), models).dtype == "auto"
    with pytest.raises(UsageError, match="--exact computes in fp32, not --dtype bf16"):
        exact_precision(UpscaleSettings(exact=True), replace(models, dtype="bf16"))


def test_exact_with_another_dtype_is_a_usage_error(tmp_path):
    proc = pasd_here("upscale", LR_INPUT, "-o", tmp_path, *tiny_model_args(), "--exact", "--dtype", "fp16")
    assert proc.returncode == 2, proc.stderr
    assert "error: --exact computes in fp32, not --dtype fp16" in proc.stderr and "hint:" in proc.stderr


CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx2 {extra}\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx2 {extra}\n"


@pytest.mark.parametrize("extra,native", [("", False), ("avx512f avx512_bf16", True), ("amx_tile amx_bf16", True)])
def test_auto_dtype_on_the_cpu_is_bf16_only_with_bf16_matrix_instructions(tmp_path, extra, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO.format(extra=extra))
    assert ("avx512_bf16" in cpu_flags(cpuinfo.read_text())) == ("avx512_bf16" in extra)
    assert cpu_has_bf16_matrix(str(cpuinfo)) is native
    cpu = torch.device("cpu")
    assert pick_dtype("auto", cpu, cpu_bf16=native) == (torch.bfloat16 if native else torch.float32)
    assert pick_dtype("fp32", cpu, cpu_bf16=True) == torch.float32


def test_auto_dtype_elsewhere():
    assert not cpu_has_bf16_matrix("/nonexistent/cpuinfo")
    assert pick_dtype("auto", torch.device("cuda"), cpu_bf16=False) == torch.float16
