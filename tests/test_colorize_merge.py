"""The colorization merge and resize: the README's fixed-point YUV formulas, OpenCV's outputs
(stored by tests/fixtures/cv2/make_cv2_reference.py), the exact-luma merge and 16-bit luma."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import COLOR_INPUT, FIXTURES
from PIL import Image

from pasd_cli.engine.colorize import ColorizeSettings
from pasd_cli.engine.linear_resize import resize_linear
from pasd_cli.engine.yuv import exact_merge, luma, max_luma_shift, released_merge, rgb_to_yuv, yuv_to_rgb

CV2 = FIXTURES / "cv2" / "cv2_reference.npz"


# -- The README's formulas, written out independently (floor division, no shared code) --------


def readme_yuv(rgb: np.ndarray) -> np.ndarray:
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    y = (1868 * b + 9617 * g + 4899 * r + 8192) // 2**14
    u = ((b - y) * 8061 + 8192 + 128 * 2**14) // 2**14
    v = ((r - y) * 14369 + 8192 + 128 * 2**14) // 2**14
    # The results are 8-bit: OpenCV saturates U and V too (V of pure red is 285 before it).
    return np.stack([y, np.clip(u, 0, 255), np.clip(v, 0, 255)], axis=-1)


def readme_rgb(yuv: np.ndarray) -> np.ndarray:
    y, u, v = (yuv[..., i].astype(np.int64) for i in range(3))
    u, v = u - 128, v - 128
    b = y + (33292 * u + 8192) // 2**14
    g = y + (-6472 * u - 9519 * v + 8192) // 2**14
    r = y + (18678 * v + 8192) // 2**14
    return np.clip(np.stack([r, g, b], axis=-1), 0, 255)


def float_luma(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(12)


def test_yuv_formulas_bit_exact_on_random_data(rng):
    rgb = rng.integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
    y, u, v = rgb_to_yuv(rgb)
    assert np.array_equal(np.stack([y, u, v], axis=-1), readme_yuv(rgb))
    yuv = rng.integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
    assert np.array_equal(yuv_to_rgb(yuv[..., 0], yuv[..., 1], yuv[..., 2]), readme_rgb(yuv))


def test_released_merge_bit_exact_on_random_data(rng):
    gray = rng.integers(0, 256, (700, 900), dtype=np.uint8)
    color = rng.integers(0, 256, (700, 900, 3), dtype=np.uint8)
    # Released: both images to YUV (the grey one's Y is its value, its U, V are 128), then the
    # grey Y with the colour U, V back to RGB.
    gray_yuv = readme_yuv(np.repeat(gray[..., None], 3, axis=-1))
    assert np.array_equal(gray_yuv[..., 0], gray) and (gray_yuv[..., 1:] == 128).all()
    expected = readme_rgb(np.concatenate([gray_yuv[..., :1], readme_yuv(color)[..., 1:]], axis=-1))
    assert np.array_equal(released_merge(gray, color), expected)


def test_yuv_and_resize_bit_exact_with_opencv():
    stored = np.load(CV2)
    assert str(stored["cv2_version"]) == "4.11.0"
    y, u, v = rgb_to_yuv(stored["yuv_rgb_in"])
    assert np.array_equal(np.stack([y, u, v], axis=-1), stored["yuv_from_rgb"])
    yuv = stored["yuv_in"]
    assert np.array_equal(yuv_to_rgb(yuv[..., 0], yuv[..., 1], yuv[..., 2]), stored["rgb_from_yuv"])
    cases = sorted(k[: -len("_in")] for k in stored.files if k.startswith("resize") and k.endswith("_in"))
    assert len(cases) == 12
    for case in cases:
        source, expected = stored[f"{case}_in"], stored[f"{case}_out"]
        ours = resize_linear(source, (expected.shape[1], expected.shape[0]))
        assert np.array_equal(ours, expected), case


def _float_bilinear(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Half-pixel centres, edge clamping, no antialiasing, in float64."""

    def axis(src, dst):
        pos = np.clip((np.arange(dst) + 0.5) * src / dst - 0.5, 0, src - 1)
        first = np.minimum(np.floor(pos).astype(int), src - 1)
        return first, np.minimum(first + 1, src - 1), pos - first

    y0, y1, fy = axis(image.shape[0], height)
    x0, x1, fx = axis(image.shape[1], width)
    s = image.astype(np.float64)
    rows = s[y0] * (1 - fy)[:, None, None] + s[y1] * fy[:, None, None]
    return rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]


@pytest.mark.parametrize(
    "size,target", [((64, 88), (56, 40)), ((40, 56), (88, 64)), ((31, 9), (5, 77)), ((3, 200), (40, 2))]
)
def test_resize_within_a_level_of_float_bilinear(rng, size, target):
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    ours = resize_linear(image, target).astype(np.float64)
    assert np.abs(ours - _float_bilinear(image, *target)).max() <= 1.0


def test_resize_keeps_layout_and_refuses_other_depths(rng):
    gray = rng.integers(0, 256, (10, 12), dtype=np.uint8)
    assert resize_linear(gray, (7, 5)).shape == (5, 7)
    assert np.array_equal(resize_linear(gray, (12, 10)), gray)
    with pytest.raises(ValueError, match="uint8"):
        resize_linear(gray.astype(np.uint16), (7, 5))


# -- Exact luma --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def colourful(rng):
    """A grey ramp under a saturated random colour result: much of it would leave the cube."""
    gray = np.tile(np.linspace(0, 255, 512).round().astype(np.uint8), (256, 1))
    color = rng.integers(0, 256, (256, 512, 3), dtype=np.uint8)
    return gray, color


def test_exact_merge_keeps_the_input_luma(colourful):
    gray, color = colourful
    released = released_merge(gray, color)
    assert max_luma_shift(released, gray) > 20  # what the test guards against
    exact = exact_merge(gray, color)
    shift = np.abs(luma(exact) - gray)
    assert shift.max() <= 1 and max_luma_shift(exact, gray) <= 1
    assert (shift == 0).mean() > 0.999
    assert np.abs(float_luma(exact.astype(np.float64)) - gray).max() <= 0.5 + 1e-9  # channel rounding


def test_exact_merge_reduces_chroma_but_keeps_its_hue(colourful):
    gray, color = colourful
    exact = exact_merge(gray, color).astype(np.float64)
    source = color.astype(np.float64)
    ours, theirs = exact - float_luma(exact)[..., None], source - float_luma(source)[..., None]
    norm_ours, norm_theirs = np.linalg.norm(ours, axis=-1), np.linalg.norm(theirs, axis=-1)
    assert (norm_ours <= norm_theirs + 1.0).all()  # chroma shortened, never lengthened
    strong = (norm_ours > 20) & (norm_theirs > 20)
    cosine = (ours * theirs).sum(-1)[strong] / (norm_ours * norm_theirs)[strong]
    assert cosine.min() > 0.99  # same hue
    # Where the colour fits at the input's luma, it is kept whole.
    fits = ((gray[..., None] + theirs) >= 0).all(-1) & ((gray[..., None] + theirs) <= 255).all(-1)
    assert fits.mean() > 0.05
    assert np.abs(ours - theirs)[fits].max() <= 1.0


def test_exact_merge_of_grey_is_grey(rng):
    gray = rng.integers(0, 256, (50, 60), dtype=np.uint8)
    assert np.array_equal(exact_merge(gray, np.repeat(gray[..., None], 3, -1)), np.repeat(gray[..., None], 3, -1))
    assert np.array_equal(exact_merge(gray, np.full((50, 60, 3), 77, np.uint8)), np.repeat(gray[..., None], 3, -1))


# -- 16-bit luma -------------------------------------------------------------------------------


def test_exact_merge_at_16_bits(colourful):
    _, color = colourful
    luma16 = np.tile(np.linspace(0, 65535, 512).round().astype(np.uint16), (256, 1))
    out = exact_merge(luma16, color, 65535)
    assert out.dtype == np.uint16 and out.shape == (256, 512, 3)
    assert np.abs(float_luma(out.astype(np.float64)) - luma16).max() <= 0.5 + 1e-6
    # The 16-bit detail is there: neighbouring luma steps of 128 survive (8 bits would merge them).
    assert len(np.unique(float_luma(out[0].astype(np.float64)).round())) == 512


def test_colorize_keeps_a_16_bit_luma(tiny_colorizer):
    width, height = 56, 40
    ramp = np.linspace(0, 65535, width * height).reshape(height, width)
    luma16 = ramp.round().astype(np.uint16)
    gray8 = Image.fromarray(np.round(luma16 / 257).astype(np.uint8))
    settings = ColorizeSettings(steps=2, seed=1234, process_size=64)
    result = tiny_colorizer.colorize(gray8, settings, luma16=luma16)
    pixels16 = result.pixels16
    assert pixels16 is not None and pixels16.dtype == np.uint16 and pixels16.shape == (height, width, 3)
    assert np.abs(float_luma(pixels16.astype(np.float64)) - luma16).max() <= 0.5 + 1e-6
    assert np.array_equal(np.asarray(result.image), np.round(pixels16 / 257).astype(np.uint8))
    assert (pixels16.max(-1) - pixels16.min(-1)).max() > 257  # it is coloured
    assert tiny_colorizer.colorize(gray8, settings).pixels16 is None


def test_16_bit_luma_needs_the_exact_merge_and_the_image_size(tiny_colorizer):
    gray = Image.open(COLOR_INPUT)
    luma16 = np.zeros((40, 56), np.uint16)
    with pytest.raises(ValueError, match="exact luma"):
        tiny_colorizer.colorize(gray, ColorizeSettings(steps=1, luma="released"), luma16=luma16)
    with pytest.raises(ValueError, match="shape"):
        tiny_colorizer.colorize(gray, ColorizeSettings(steps=1), luma16=luma16.T.copy())
