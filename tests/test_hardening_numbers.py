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
