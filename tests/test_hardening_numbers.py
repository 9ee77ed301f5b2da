"""Issue 13, item 6: every number option is finite (and in range), else exit 2 before any work.
Python reads "inf", "nan" and "1e999" as floats; they used to reach the engine (a black image
recorded as done, no guidance at all, or a traceback)."""

from __future__ import annotations

import math

import pytest
from conftest import tiny_model_args
from hardening import pasd_in_process
from PIL import Image

from pasd_cli.engine.settings import StylizeSettings, UpscaleSettings

NOT_FINITE = ["inf", "-inf", "nan", "1e999"]


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (16, 16), "red").save(path)
    return path


@pytest.mark.parametrize("value", NOT_FINITE)
@pytest.mark.parametrize(
    "command, option",
    [
        ("upscale", "--guidance"),
        ("upscale", "--conditioning-scale"),
        ("upscale", "--scale"),
        ("colorize", "--guidance"),
        ("stylize", "--conditioning-scale"),
        ("stylize", "--blend"),
    ],
)
def test_a_number_that_is_not_finite_is_a_usage_error(capsys, tmp_path, photo, command, option, value):
    style = ["--style", str(tmp_path)] if command == "stylize" else []
    run = pasd_in_process(
        capsys, command, photo, "-o", tmp_path / "out", *tiny_model_args(), *style, option, value, "--dry-run"
    )
    assert run.code == 2, run.stderr
    assert f"{option} {value}: must be a finite number" in run.one_error()
    assert not (tmp_path / "out").exists()


def float_options() -> list[tuple[str, str]]:
    """(command, flag) of every float option the image commands declare (from the signatures
    Typer reads)."""
    import inspect
    import typing

    from pasd_cli.cli.app import app

    found = []
    for info in app.registered_commands:
        name = info.name or info.callback.__name__
        for param in inspect.signature(info.callback).parameters.values():
            numbers = {param.annotation} | set(typing.get_args(param.annotation))
            flags = getattr(param.default, "param_decls", None) or ()
            if float in numbers and flags:
                found.append((name, max(flags, key=len)))
    return found


def test_every_float_option_of_every_command_is_checked(capsys, tmp_path, photo):
    """Not only the options the issue names: every float a command declares gets the check."""
    options = float_options()
    assert {("upscale", "--guidance"), ("stylize", "--blend"), ("colorize", "--conditioning-scale")} <= set(options)
    for command, option in options:
        style = ["--style", str(tmp_path)] if command == "stylize" else []
        run = pasd_in_process(
            capsys, command, photo, "-o", tmp_path / "out", *tiny_model_args(), *style, option, "inf", "--dry-run"
        )
        assert run.code == 2, (command, option, run.stderr)
        assert f"{option} inf: must be a finite number" in run.one_error()


@pytest.mark.parametrize("field", ["guidance", "conditioning_scale", "scale"])
@pytest.mark.parametrize("settings", [UpscaleSettings, StylizeSettings])
def test_the_engine_settings_refuse_non_finite_numbers_too(settings, field):
    with pytest.raises(ValueError, match="must be a finite number"):
        settings(**{field: math.nan})


def test_the_steps_stay_within_the_schedule():
    """A sibling of non-finite numbers: 1000 UniPC steps repeat a timestep of SD 1.5's schedule
    and divide by the zero step between them. Shown on the scheduler itself, then refused."""
    import json

    import torch
    from conftest import TINY_BASE

    from pasd_cli.engine.schedulers import PortableUniPCScheduler
    from pasd_cli.engine.settings import MAX_STEPS

    config = json.loads((TINY_BASE / "scheduler" / "scheduler_config.json").read_text())

    def finite_after(steps: int) -> bool:
        scheduler = PortableUniPCScheduler.from_config(PortableUniPCScheduler.from_config(config).config)
        scheduler.set_timesteps(steps)
        generator = torch.Generator().manual_seed(0)
        latents = torch.randn(1, 4, 4, 4, generator=generator)
        for t in scheduler.timesteps:
            latents = scheduler.step(0.1 * torch.randn(1, 4, 4, 4, generator=generator), t, latents).prev_sample
        return bool(torch.isfinite(latents).all())

    assert finite_after(MAX_STEPS) and not finite_after(MAX_STEPS + 1)
    UpscaleSettings(steps=MAX_STEPS)
    with pytest.raises(ValueError, match=f"steps must be at most {MAX_STEPS}"):
        UpscaleSettings(steps=MAX_STEPS + 1)


def test_fast_steps_stay_within_the_lcm_schedule(capsys, tmp_path, photo):
    run = pasd_in_process(
        capsys, "stylize", photo, "-o", tmp_path / "out", "--style", tmp_path, "--fast", "--steps", "51", "--dry-run"
    )
    assert run.code == 2, run.stderr
    assert "--steps 51: --fast's LCM schedule takes at most 50 steps" in run.one_error()
