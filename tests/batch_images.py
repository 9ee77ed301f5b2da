"""A folder of real, awkward image files for the batch tests, made with Pillow at test time."""

from __future__ import annotations

import functools
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import png
from PIL import Image, ImageCms

XMP = (
    b'<?xpacket begin="\xef\xbb\xbf" id="W5M0MpCehiHzreSzNTczkc9d"?>'
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    b'<rdf:Description rdf:about="" xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
    b'xmlns:exif="http://ns.adobe.com/exif/1.0/" xmlns:dc="http://purl.org/dc/elements/1.1/" '
    b'tiff:Orientation="6" exif:PixelXDimension="24" exif:PixelYDimension="16">'
    b"<dc:creator><rdf:Seq><rdf:li>A. Photographer</rdf:li></rdf:Seq></dc:creator>"
    b'</rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
)

# name -> what the output must be: (size, mode) at --scale 2; None for inputs that must fail.
GOOD = {
    "rotated.jpg": ((32, 48), "RGB"),  # stored 24x16, EXIF orientation 6: shown 16x24
    "rgba.png": ((40, 32), "RGBA"),
    "gray.png": ((32, 32), "L"),
    "palette.png": ((32, 40), "RGB"),
    "gray16.png": ((32, 32), "I;16"),
    "rgb16.png": ((32, 24), "RGB"),  # 16 bits a channel: Pillow shows it as RGB
    "cmyk.jpg": ((32, 32), "RGB"),
    "photo.webp": ((40, 32), "RGB"),
    "UPPER.JPG": ((32, 32), "RGB"),
    "sub/nested.png": ((32, 32), "RGB"),
    "sub/same_as_upper.jpg": ((32, 32), "RGB"),  # same pixels as UPPER.JPG, later in the order
}
BAD = {
    "truncated.jpg": "cannot decode",
    "empty.png": "empty file",
    "notes.png": "not an image",
    "huge.png": "decompression-bomb",  # header claims 50000x50000
    "big.png": "input limit",  # header claims 8200x8200: above our limit, below Pillow's guard
}
HIDDEN = {".hidden.png": "hidden file"}


@functools.cache
def srgb_icc() -> bytes:
    # Made once: the profile records its creation time, so two calls a second apart differ.
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _split_colours(size, first=(220, 30, 30), second=(30, 30, 220)) -> Image.Image:
    """Left half `first`, right half `second`: shows where a rotation put things."""
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[:, : size[0] // 2] = first
    pixels[:, size[0] // 2 :] = second
    return Image.fromarray(pixels)


def _textured(size, seed) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with no pixel data worth decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
    )


def rgb16_gradient(size) -> np.ndarray:
    """Red rises left to right, green falls, blue rises top to bottom: smooth 16-bit ramps whose
    low bytes carry information (8-bit values times 257 would not)."""
    width, height = size
    ramp_x, ramp_y = np.linspace(700, 64800, width), np.linspace(1300, 64100, height)
    planes = [np.tile(ramp_x, (height, 1)), np.tile(ramp_x[::-1], (height, 1)), np.tile(ramp_y[:, None], (1, width))]
    return np.stack(planes, -1).round().astype(np.uint16)


def make_photo_folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir()

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    exif[0x010F] = "TestCam"
    exif.get_ifd(0x8769)[0xA002] = 24
    exif.get_ifd(0x8769)[0xA003] = 16
    _split_colours((24, 16)).save(root / "rotated.jpg", "JPEG", quality=95, exif=exif, icc_profile=srgb_icc(), xmp=XMP)

    rgba = _textured((20, 16), 1).convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, 20, dtype=np.uint8), (16, 1))
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(root / "rgba.png")

    Image.fromarray(np.tile(np.linspace(0, 255, 16, dtype=np.uint8), (16, 1))).save(root / "gray.png")
    _textured((16, 20), 2).quantize(16).save(root / "palette.png")
    gradient16 = np.tile(np.linspace(1000, 64000, 16).astype(np.uint16), (16, 1))
    Image.fromarray(gradient16).save(root / "gray16.png")
    with open(root / "rgb16.png", "wb") as handle:  # Pillow cannot write 16-bit RGB
        png.Writer(16, 12, greyscale=False, bitdepth=16).write_array(handle, rgb16_gradient((16, 12)).ravel())
    _textured((16, 16), 3).convert("CMYK").save(root / "cmyk.jpg", "JPEG")
    _textured((20, 16), 4).save(root / "photo.webp", "WEBP", quality=90)
    _textured((16, 16), 5).save(root / "UPPER.JPG", "JPEG")
    (root / "sub" / "same_as_upper.jpg").write_bytes((root / "UPPER.JPG").read_bytes())
    _textured((16, 16), 6).save(root / "sub" / "nested.png")
    _textured((16, 16), 7).save(root / ".hidden.png")

    buffer = io.BytesIO()
    _textured((64, 64), 8).save(buffer, "JPEG")
    (root / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "notes.png").write_text("these are notes, not a picture\n")
    (root / "huge.png").write_bytes(png_header_only(50000, 50000))
    (root / "big.png").write_bytes(png_header_only(8200, 8200))
    (root / "README.txt").write_text("not an image, not an input\n")
    return root
