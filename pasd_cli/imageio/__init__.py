"""Images in and out: what is read and written (`formats.py`, plain data), header probes and
decoding with orientation, alpha, gray and 16-bit split from what the model sees (`images.py`),
16-bit RGB(A) files Pillow cannot hold (`rgb16.py`), and the metadata carried to the output with
pasd's own record (`metadata.py`).

The formats load at once; the rest (numpy, Pillow) on first use of a name that needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .formats import (
    DEFAULT_QUALITY,
    FILE_OUTPUT_FORMATS,
    IMAGE_SUFFIXES,
    MAX_INPUT_PIXELS,
    OTHER_IMAGE_SUFFIXES,
    OUTPUT_FORMATS,
    SAME_FORMAT,
    OutputFormat,
)

if TYPE_CHECKING:
    from .images import RGB16, ImageInfo, LoadedImage, bits, encode, load, output_format, probe, read_rgb, restore

_LAZY = ("RGB16", "ImageInfo", "LoadedImage", "bits", "encode", "load", "output_format", "probe", "read_rgb", "restore")

__all__ = [
    "DEFAULT_QUALITY",
    "FILE_OUTPUT_FORMATS",
    "IMAGE_SUFFIXES",
    "MAX_INPUT_PIXELS",
    "OTHER_IMAGE_SUFFIXES",
    "OUTPUT_FORMATS",
    "SAME_FORMAT",
    "OutputFormat",
    "RGB16",
    "ImageInfo",
    "LoadedImage",
    "bits",
    "encode",
    "load",
    "output_format",
    "probe",
    "read_rgb",
    "restore",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.images"), name)
    globals()[name] = value
    return value
