"""Telling black-and-white inputs from colour ones (engine/grayscale.py): grey pictures, JPEG'd
grey scans and toned prints pass; colour photos, muted ones and a coloured patch do not."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pasd_cli.engine.grayscale import is_grayscale

SIZE = (192, 256)  # (H, W)


def gray_scene(seed: int = 0) -> np.ndarray:
    """A grey picture with gradients, blocks and edges, float in [0, 255]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : SIZE[0], 0 : SIZE[1]]
    scene = 128 + 90 * np.sin(x / 23.0) * np.cos(y / 31.0)
    scene[40:90, 60:140] = 30
    scene[120:170, 150:230] = 225
    return np.clip(scene + rng.normal(0, 4, SIZE), 0, 255)


def as_rgb(channels: np.ndarray) -> np.ndarray:
    return np.clip(np.round(channels), 0, 255).astype(np.uint8)


def jpeg(rgb: np.ndarray, quality: int = 75, subsampling: int = 2) -> np.ndarray:
    """Through a JPEG file; subsampling 2 is 4:2:0 (chroma blurred), 0 is 4:4:4."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=quality, subsampling=subsampling)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def scanned(gray: np.ndarray, seed: int = 1, noise: float = 2.0) -> np.ndarray:
    """A grey print scanned in colour: independent sensor noise in each channel."""
    rng = np.random.default_rng(seed)
    return as_rgb(gray[..., None] + rng.normal(0, noise, (*SIZE, 3)))


def sepia(gray: np.ndarray, strength: float = 1.0) -> np.ndarray:
    """A toned print: brown shadows and mid-tones, cream highlights (the hue drifts with level)."""
    level = gray / 255
    red, green = np.full_like(level, 1 + 0.18 * strength), np.full_like(level, 1 + 0.02 * strength)
    tone = np.stack([red, green, 1 - 0.25 * strength * (1 - 0.3 * level)], -1)
    return as_rgb(gray[..., None] * tone)


def test_grey_pictures_in_any_form():
    gray = gray_scene()
    assert is_grayscale(as_rgb(np.repeat(gray[..., None], 3, -1)))
    assert is_grayscale(Image.fromarray(as_rgb(gray)))  # an "L" image
    assert is_grayscale(Image.fromarray(as_rgb(gray)).convert("RGB"))
    assert is_grayscale(as_rgb(gray))  # a single-channel array
    sixteen = (as_rgb(np.repeat(gray[..., None], 3, -1)).astype(np.uint16) * 257) + 3
    assert is_grayscale(sixteen)


def test_jpeg_of_a_grey_photo_scanned_in_colour():
    rgb = jpeg(scanned(gray_scene(), noise=3.0), quality=90, subsampling=0)
    assert (rgb.max(-1) - rgb.min(-1)).max() > 8  # there is chroma noise to tolerate
    assert is_grayscale(rgb)
    assert is_grayscale(Image.fromarray(rgb))
    assert is_grayscale(jpeg(scanned(gray_scene(), noise=6.0), quality=60))


@pytest.mark.parametrize("strength", [0.4, 1.0, 2.0])
def test_sepia_and_other_toned_prints(strength):
    toned = jpeg(sepia(gray_scene(), strength))
    assert (toned[..., 0].astype(int) - toned[..., 2]).max() > 20  # clearly toned
    assert is_grayscale(toned)
    cyanotype = as_rgb(gray_scene()[..., None] * np.array([0.75, 0.9, 1.15]))
    assert is_grayscale(jpeg(cyanotype))


def test_split_toning_is_monochrome():
    """Blue shadows, yellow highlights: the tone still follows the density alone."""
    gray = gray_scene()
    turn = np.tanh((gray - 128) / 40)[..., None]  # chemical toning changes smoothly with density
    split = gray[..., None] + turn * np.array([8, 4, -25])
    assert is_grayscale(jpeg(as_rgb(split)))


def test_colour_photos(color_reference):
    source = color_reference["public_source_rgb_uint8"].permute(1, 2, 0).numpy()
    assert not is_grayscale(source)
    assert not is_grayscale(jpeg(source, quality=50))
    # A muted colour photo: a green field under a blue sky, weak chroma.
    gray = gray_scene()
    muted = np.repeat(gray[..., None], 3, -1)
    muted[: SIZE[0] // 2] += np.array([-12, 0, 14])
    muted[SIZE[0] // 2 :] += np.array([-10, 12, -10])
    assert not is_grayscale(as_rgb(muted))


def test_a_coloured_patch_counts_beyond_the_outlier_share():
    base = np.repeat(gray_scene()[..., None], 3, -1)
    big, small = base.copy(), base.copy()
    big[:40, :60] = [220, 30, 40]  # 4.9% of the pixels
    small[:10, :20] = [220, 30, 40]  # 0.4%: dust, a stamp; below the 1% share
    assert not is_grayscale(as_rgb(big))
    assert is_grayscale(as_rgb(small))
    assert not is_grayscale(as_rgb(small), outliers=0.001)


def test_the_tolerance_is_in_chroma_levels():
    """Two faint casts, 5.4 chroma levels apart from their common tone: grey by default (6),
    colour at 2."""
    cast = np.repeat(gray_scene()[..., None], 3, -1)
    cast[: SIZE[0] // 2] += np.array([-4, 0, 4])
    cast[SIZE[0] // 2 :] += np.array([-4, 4, -4])
    assert is_grayscale(as_rgb(cast))
    assert not is_grayscale(as_rgb(cast), tolerance=2)


def test_large_images_are_subsampled_but_still_judged():
    rgb = np.repeat(as_rgb(gray_scene())[..., None], 3, -1)
    large = np.tile(rgb, (8, 8, 1))  # 1536x2048, 3.1 M pixels
    assert is_grayscale(large)
    large[:300, :400] = [30, 200, 60]
    assert not is_grayscale(large)


def test_bad_arrays_are_refused():
    with pytest.raises(ValueError, match="uint8 or uint16"):
        is_grayscale(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        is_grayscale(np.zeros((4, 4, 5), np.uint8))
