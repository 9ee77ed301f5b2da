"""Reading, restoring and writing images without a model: the enlarged 'model output' here is a
plain bicubic resize of what `load` hands the model, so only pasd's own handling is under test."""

from __future__ import annotations

import errno
import io
import os
import zlib

import numpy as np
import png
import pytest
import tifffile
from batch_images import rgb16_gradient, srgb_icc
from PIL import Image, ImageOps

from pasd_cli.atomic import write_atomic
from pasd_cli.errors import DeviceError, InputError, Interrupted, OutputError
from pasd_cli.imageio import images as imageio
from pasd_cli.imageio import rgb16 as deep
from pasd_cli.imageio.metadata import read_record

RECORD = {"command": "upscale", "settings": {"steps": 3}, "model": {"pasd": "/models/pasd", "variant": "full"}}


def _through(path, fmt, scale=2):
    loaded = imageio.load(path)
    size = (loaded.rgb.width * scale, loaded.rgb.height * scale)
    image = imageio.restore(loaded.rgb.resize(size, Image.Resampling.BICUBIC), loaded)
    buffer = io.BytesIO()
    imageio.encode(image, buffer, fmt, loaded, RECORD)
    buffer.seek(0)
    return Image.open(buffer)


def _exif_with_sub_ifd():
    exif = Image.Exif()
    exif[0x010F] = "TestCam"
    exif.get_ifd(0x8769)[0xA002] = 16
    exif.get_ifd(0x8769)[0xA003] = 12
    exif.get_ifd(0x8769)[0x9003] = "2024:05:06 07:08:09"
    written = Image.Exif()  # as read from a file: the sub-directory pointer is a tag of its own
    written.load(exif.tobytes())
    return written


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_16_bit_tiff_stays_16_bit_with_its_metadata(tmp_path, fmt):
    pixels = np.tile(np.linspace(300, 65000, 16).astype(np.uint16), (12, 1))
    source = tmp_path / "scan.tif"
    Image.fromarray(pixels).save(source, "TIFF", tiffinfo=_exif_with_sub_ifd())
    out = _through(source, fmt)
    assert (out.mode, out.size) == ("I;16", (32, 24))
    exif = out.getexif()
    assert exif[0x010F] == "TestCam" and exif[0x0131].startswith("pasd")
    assert dict(exif.get_ifd(0x8769)) == {0xA002: 32, 0xA003: 24, 0x9003: "2024:05:06 07:08:09"}
    assert 273 not in exif or fmt == "tiff"  # the input's strip offsets are not carried into a PNG
    assert read_record(out) == RECORD
    values = np.asarray(out)
    assert values[:, 0].mean() < 2000 and values[:, -1].mean() > 60000
    assert len(np.unique(values % 257)) > 4  # 16-bit precision, not 8-bit values times 257


def _gradient16(size, channels=3):
    """`rgb16_gradient`, with an alpha that rises top to bottom as blue does."""
    pixels = rgb16_gradient(size)
    return np.dstack([pixels, pixels[..., 2]]) if channels == 4 else pixels


def _png16(path, pixels, icc=None, exif=None):
    """A 16-bit PNG written by pypng, with an iCCP and an eXIf chunk added."""
    buffer = io.BytesIO()
    height, width, planes = pixels.shape
    png.Writer(width, height, greyscale=False, alpha=planes == 4, bitdepth=16).write_array(buffer, pixels.ravel())
    chunks = list(png.Reader(bytes=buffer.getvalue()).chunks())
    extra = []
    if icc:
        extra.append((b"iCCP", b"ICC\0\0" + zlib.compress(icc)))
    if exif is not None:
        extra.append((b"eXIf", exif.tobytes()[6:]))
    with open(path, "wb") as handle:
        png.write_chunks(handle, [chunks[0], *extra, *chunks[1:]])


def _read16(data: bytes, fmt: str) -> np.ndarray:
    if fmt == "png":
        width, height, flat, info = png.Reader(bytes=data).read_flat()
        assert info["bitdepth"] == 16
        return np.asarray(flat, dtype=np.uint16).reshape(height, width, info["planes"])
    return tifffile.imread(io.BytesIO(data))


def _written(path, fmt, scale=2):
    """What `encode` writes for `path` at `scale` (bicubic stand-in for the model): the bytes and the
    value `encode` returned."""
    loaded = imageio.load(path)
    size = (loaded.rgb.width * scale, loaded.rgb.height * scale)
    image = imageio.restore(loaded.rgb.resize(size, Image.Resampling.BICUBIC), loaded)
    buffer = io.BytesIO()
    written = imageio.encode(image, buffer, fmt, loaded, RECORD)
    return buffer.getvalue(), written, loaded


@pytest.mark.parametrize("fmt", ["png", "tiff"])
@pytest.mark.parametrize("source_format", ["png", "tiff"])
def test_16_bit_rgb_stays_16_bit_with_its_metadata(tmp_path, source_format, fmt):
    stored = _gradient16((16, 12))  # orientation 6: shown 12 wide, 16 high, stored left on top
    if source_format == "png":
        exif = _exif_with_sub_ifd()
        exif[0x0112] = 6
        source = tmp_path / "scan.png"
        _png16(source, stored, srgb_icc(), exif)
    else:
        source = tmp_path / "scan.tif"
        tifffile.imwrite(
            source,
            stored,
            photometric="rgb",
            iccprofile=srgb_icc(),
            metadata=None,
            extratags=[(0x010F, "s", 0, "TestCam", True), (0x0112, "H", 1, 6, True)],
        )
    data, written, loaded = _written(source, fmt)
    assert (imageio.bits(written), written.mode, loaded.notes) == (16, "RGB", [])
    values = _read16(data, fmt)
    assert values.dtype == np.uint16 and values.shape == (32, 24, 3)
    assert np.any(values % 256 != values // 256)  # not 8-bit values times 257
    assert len(np.unique(values[..., 0] % 257)) > 8
    # Red rose left to right as stored; orientation 6 turns that into top to bottom.
    assert values[:4, :, 0].mean() < 8000 and values[-4:, :, 0].mean() > 57000
    assert values[:4, :, 1].mean() > 57000 and values[-4:, :, 1].mean() < 8000
    with Image.open(io.BytesIO(data)) as out:
        assert out.size == (24, 32) and out.info["icc_profile"] == srgb_icc()
        assert read_record(out) == RECORD
        exif = out.getexif()
        assert exif[0x010F] == "TestCam" and exif[0x0131].startswith("pasd") and 0x0112 not in exif
        if source_format == "png":  # the Exif sub-directory, sizes updated
            assert dict(exif.get_ifd(0x8769)) == {0xA002: 24, 0xA003: 32, 0x9003: "2024:05:06 07:08:09"}


def test_16_bit_rgba_png_keeps_its_alpha_at_16_bits_and_jpeg_stays_8_bit(tmp_path):
    _png16(tmp_path / "rgba.png", _gradient16((12, 10), channels=4))
    data, written, _ = _written(tmp_path / "rgba.png", "png")
    values = _read16(data, "png")
    assert written.mode == "RGBA" and values.shape == (20, 24, 4)
    alpha = values[..., 3]
    assert np.any(alpha % 256 != alpha // 256) and len(np.unique(alpha % 257)) > 8
    assert alpha[:3].mean() < 12000 and alpha[-3:].mean() > 53000  # rises top to bottom
    assert np.any(values[..., :3] % 256 != values[..., :3] // 256)

    data, written, loaded = _written(tmp_path / "rgba.png", "jpg")
    with Image.open(io.BytesIO(data)) as out:
        assert (imageio.bits(written), out.mode, out.size) == (8, "RGB", (24, 20))
    assert "alpha flattened" in "; ".join(loaded.notes)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_16_bit_pixels_turn_as_pillow_turns_them(orientation):
    stored = np.arange(5 * 3 * 3, dtype=np.uint8).reshape(5, 3, 3)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.info["exif"] = exif.tobytes()
    assert np.array_equal(deep.orient(stored, orientation), np.asarray(ImageOps.exif_transpose(image)))


def test_16_bit_rgb_the_extra_reader_cannot_decode_comes_out_8_bit(tmp_path, monkeypatch):
    tifffile.imwrite(tmp_path / "scan.tif", _gradient16((8, 6)), photometric="rgb", metadata=None)

    def unreadable(path, fmt):
        raise ValueError("<COMPRESSION.LZW: 5> requires the 'imagecodecs' package")

    monkeypatch.setattr(deep, "read", unreadable)
    data, written, loaded = _written(tmp_path / "scan.tif", "tiff")
    assert "read as 8-bit" in "; ".join(loaded.notes)
    with Image.open(io.BytesIO(data)) as out:
        assert (imageio.bits(written), out.mode, out.size) == (8, "RGB", (16, 12))


def test_palette_with_transparency_and_gray_alpha(tmp_path):
    palette = Image.new("P", (8, 6), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (4, 0, 8, 6))
    palette.save(tmp_path / "p.png", transparency=1)
    out = _through(tmp_path / "p.png", "png")
    assert out.mode == "RGBA"
    alpha = np.asarray(out.getchannel("A"))
    assert alpha[:, :6].min() == 255 and alpha[:, -6:].max() == 0

    gray_alpha = Image.merge("LA", [Image.new("L", (8, 6), 90), Image.new("L", (8, 6), 128)])
    gray_alpha.save(tmp_path / "la.png")
    out = _through(tmp_path / "la.png", "webp")
    assert out.mode in ("LA", "RGBA") and out.getchannel("A").getextrema() == (128, 128)


def test_alpha_is_flattened_onto_white_for_jpeg(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.save(tmp_path / "clear.png")
    loaded = imageio.load(tmp_path / "clear.png")
    image = imageio.restore(loaded.rgb.resize((16, 16)), loaded)
    buffer = io.BytesIO()
    written = imageio.encode(image, buffer, "jpg", loaded, RECORD)
    assert written.mode == "RGB" and np.asarray(written).min() >= 250
    assert "alpha flattened" in "; ".join(loaded.notes)


def test_write_atomic_turns_a_full_disk_into_device_error_and_leaves_nothing(tmp_path):
    target = tmp_path / "out" / "a.png"

    def fill_the_disk(handle):
        handle.write(b"partial data")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DeviceError, match="disk full"):
        write_atomic(target, fill_the_disk)
    assert list(target.parent.iterdir()) == []


@pytest.mark.parametrize("error", [Interrupted("interrupted by SIGINT"), KeyboardInterrupt()])
def test_write_atomic_interrupted_keeps_the_old_file_and_no_temporary(tmp_path, error):
    target = tmp_path / "a.png"
    target.write_bytes(b"the previous result")

    def interrupted(handle):
        handle.write(b"half of the new result")
        raise error

    with pytest.raises(type(error)):
        write_atomic(target, interrupted)
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]
    assert target.read_bytes() == b"the previous result"


def test_results_get_the_usual_permissions(tmp_path):
    mask = os.umask(0o027)
    try:
        write_atomic(tmp_path / "a.png", lambda handle: handle.write(b"x"))
    finally:
        os.umask(mask)
    assert (tmp_path / "a.png").stat().st_mode & 0o777 == 0o640


def test_other_write_errors_fail_only_that_output(tmp_path):
    (tmp_path / "a.png").mkdir()  # a folder where the file should go
    with pytest.raises(OutputError):
        write_atomic(tmp_path / "a.png", lambda handle: handle.write(b"x"))
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


def test_probe_reads_headers_only_and_refuses_with_reasons(tmp_path):
    Image.new("RGB", (30, 20)).save(tmp_path / "a.gif")
    with pytest.raises(InputError, match="GIF images are not supported"):
        imageio.probe(tmp_path / "a.gif")
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:])
    with pytest.raises(InputError, match="2 frames"):
        imageio.probe(tmp_path / "anim.webp")


def test_camera_jpeg_with_a_preview_picture_is_a_jpeg(tmp_path):
    photo, preview = Image.new("RGB", (24, 16), "red"), Image.new("RGB", (6, 4), "blue")
    photo.save(tmp_path / "phone.jpg", "MPO", save_all=True, append_images=[preview])
    assert Image.open(tmp_path / "phone.jpg").format == "MPO"
    info = imageio.probe(tmp_path / "phone.jpg")
    assert (info.format, info.size) == ("JPEG", (24, 16))
    loaded = imageio.load(tmp_path / "phone.jpg")
    assert loaded.rgb.size == (24, 16) and loaded.rgb.getpixel((3, 3))[0] > 200


@pytest.mark.parametrize("fmt", ["TIFF", "JPEG", "PNG"])
def test_probe_gives_the_size_as_displayed_like_load(tmp_path, fmt):
    """Orientation 6 (turned 90 degrees): the dry run's size is the size the image is upscaled at."""
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / f"turned.{fmt.lower()}"
    Image.new("RGB", (16, 12), "red").save(path, fmt, exif=exif)
    assert imageio.probe(path).size == (12, 16)
    assert imageio.load(path).rgb.size == (12, 16)
