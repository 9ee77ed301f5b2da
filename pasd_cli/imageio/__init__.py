"""Images in and out: header probes, decoding with orientation, alpha, gray and 16-bit split from
what the model sees (`images.py`), 16-bit RGB(A) files Pillow cannot hold (`rgb16.py`), and the
metadata carried to the output with pasd's own record (`metadata.py`)."""

from .images import (
    DEFAULT_QUALITY,
    IMAGE_SUFFIXES,
    MAX_INPUT_PIXELS,
    OUTPUT_FORMATS,
    RGB16,
    ImageInfo,
    LoadedImage,
    OutputFormat,
    bits,
    encode,
    load,
    output_format,
    probe,
    read_rgb,
    restore,
)

__all__ = [
    "DEFAULT_QUALITY",
    "IMAGE_SUFFIXES",
    "MAX_INPUT_PIXELS",
    "OUTPUT_FORMATS",
    "RGB16",
    "ImageInfo",
    "LoadedImage",
    "OutputFormat",
    "bits",
    "encode",
    "load",
    "output_format",
    "probe",
    "read_rgb",
    "restore",
]
