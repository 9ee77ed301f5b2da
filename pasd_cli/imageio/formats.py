"""What pasd reads and writes, as plain data: no image library is imported here, so planning and
the command line's options can use it cheaply."""

from __future__ import annotations

from dataclasses import dataclass

READ_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".jpe", ".webp", ".tif", ".tiff", ".bmp"}
# Other names of image files. A folder walk takes them too, so that each gets a record: processed
# when the content is one of READ_FORMATS (a .jfif is a JPEG), else refused with the reason.
OTHER_IMAGE_SUFFIXES = {
    *(".jfif", ".mpo", ".gif", ".apng", ".avif", ".heic", ".heif", ".jxl", ".jp2", ".j2k", ".jpx"),
    *(".ico", ".icns", ".psd", ".xcf", ".svg", ".eps", ".tga", ".pcx", ".ppm", ".pgm", ".pbm", ".pnm"),
    *(".dds", ".exr", ".hdr", ".qoi", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2", ".raf"),
}
# Larger inputs are refused from their header alone, before any decoding. 64 MP is far above
# what a diffusion upscaler can enlarge usefully, and below Pillow's own decompression-bomb guard.
MAX_INPUT_PIXELS = 64_000_000


@dataclass(frozen=True)
class OutputFormat:
    pillow: str
    suffix: str
    bits16: bool  # can hold 16-bit gray, RGB and RGBA
    alpha: bool


OUTPUT_FORMATS = {
    "png": OutputFormat("PNG", ".png", True, True),
    "jpg": OutputFormat("JPEG", ".jpg", False, False),
    "webp": OutputFormat("WEBP", ".webp", False, True),
    "tiff": OutputFormat("TIFF", ".tiff", True, True),
}
# `-o photo_big.png` with one input: the output file's suffix names its format.
FILE_OUTPUT_FORMATS = {
    ".png": "png",
    ".jpg": "jpg",
    ".jpeg": "jpg",
    ".jpe": "jpg",
    ".webp": "webp",
    ".tif": "tiff",
    ".tiff": "tiff",
}
DEFAULT_QUALITY = {"jpg": 95, "webp": 95}
# `--format same`: BMP can carry neither metadata nor pasd's record, so its results are PNGs.
SAME_FORMAT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "TIFF": "tiff", "BMP": "png"}
