"""Colorization's released rules: the prompt, the resize, the settings it forces."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pasd_cli.engine.colorize import (
    COLOR_NEGATIVE_PROMPT,
    ColorizeSettings,
    colorize_hint,
    colorize_prompt,
    colorize_size,
)
from pasd_cli.errors import InputError


@pytest.mark.parametrize(
    "user_prompt,expected",
    [
        ("", ""),
        ("a street", "a street, "),
        ("a black and white photo", "a color photo, "),
        ("black and white, black and white", "color, color, "),
        ("Black and White photo", "Black and White photo, "),  # case-sensitive, as released
        ("black-and-white photo", "black-and-white photo, "),
    ],
)
def test_prompt_rule_without_caption(user_prompt, expected):
    assert colorize_prompt(user_prompt) == expected


def test_prompt_rule_replaces_in_the_caption_too():
    # A caption of a grey photo names it; the released code replaces after building the prompt.
    assert colorize_prompt("", caption="a black and white photo of a dog") == "a color photo of a dog"
    assert colorize_prompt("sunny", caption="a black and white blurry street") == "a color clear street sunny"
    assert colorize_prompt("old", label="black and white cat") == "old, color cat, "


def test_no_added_prompt_and_the_fixed_negative():
    settings = ColorizeSettings()
    assert settings.added_prompt == "" and settings.negative_prompt == COLOR_NEGATIVE_PROMPT == "b&w, color bleeding"
    assert (settings.scale, settings.color_fix, settings.luma) == (1.0, "none", "exact")
    assert (settings.steps, settings.guidance, settings.process_size, settings.added_noise_level) == (20, 9.0, 768, 900)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"luma": "clip"}, "luma must be one of"),
        ({"scale": 2}, "scale must be 1"),
        ({"color_fix": "wavelet"}, "colour fix"),
    ],
)
def test_settings_refuse_what_colorization_cannot_do(changes, message):
    with pytest.raises(ValueError, match=message):
        ColorizeSettings(**changes)


def _readme_rule(width: int, height: int, p: int) -> tuple[int, int]:
    """The README's wording, step by step, for comparison over many sizes."""
    short, long = min(width, height), max(width, height)
    new_short, new_long = p, int(p * long / short)
    if new_long > 2 * p:
        new_short = int(2 * p * new_short / new_long)
        new_long = 2 * p
    return (new_short, new_long) if width <= height else (new_long, new_short)


@pytest.mark.parametrize(
    "size,p,expected",
    [
        ((56, 40), 64, (89, 64)),  # the public run
        ((40, 56), 64, (64, 89)),
        ((64, 64), 64, (64, 64)),
        ((300, 200), 64, (96, 64)),  # larger than P: reduced
        ((2000, 1500), 768, (1024, 768)),
        ((150, 100), 100, (150, 100)),  # long side 1.5P: not capped
        ((201, 100), 100, (200, 99)),  # just over 2P: capped, short side truncated
        ((400, 100), 64, (128, 32)),  # long thin: capped at 2P
        ((100, 400), 64, (32, 128)),
        ((70, 30), 64, (128, 54)),
        ((1000, 50), 64, (128, 6)),
        ((30, 1000), 64, (3, 128)),
    ],
)
def test_resize_rule(size, p, expected):
    assert colorize_size(size, p) == expected == _readme_rule(*size, p)


def test_resize_rule_over_many_sizes():
    rng = np.random.default_rng(7)
    for width, height, p in rng.integers(1, 3000, (500, 3)):
        assert colorize_size((int(width), int(height)), int(p)) == _readme_rule(int(width), int(height), int(p))


def test_hint_is_bilinear_then_bicubic_to_multiples_of_8():
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (100, 400, 3), dtype=np.uint8))
    before = np.asarray(image).copy()
    hint = colorize_hint(image, 60)  # (400, 100) -> (120, 30) -> (120, 24)
    expected = image.resize((120, 30), Image.Resampling.BILINEAR).resize((120, 24), Image.Resampling.BICUBIC)
    assert hint.size == (120, 24) and np.array_equal(np.asarray(hint), np.asarray(expected))
    assert np.array_equal(np.asarray(image), before)  # the input is not modified


def test_hint_at_the_process_size_is_not_resampled():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(colorize_hint(image, 64)), np.asarray(image))


def test_too_narrow_an_image_is_a_one_line_input_error():
    with pytest.raises(InputError) as caught:
        colorize_hint(Image.new("RGB", (1000, 50)), 64)  # short side 6 px at process size 64
    assert "1000x50" in str(caught.value) and "\n" not in str(caught.value)
    assert caught.value.hint == "use a larger process size"
    assert colorize_hint(Image.new("RGB", (1000, 50)), 128).size == (256, 8)  # 256x12, cut to 8
