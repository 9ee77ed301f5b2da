"""Reading input images and writing results atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError


def read_rgb(path: Path) -> Image.Image:
    """An 8-bit RGB image with its EXIF orientation applied; one-line errors for bad files."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except UnidentifiedImageError:
        raise InputError(f"{path}: not an image Pillow can read") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"{path}: cannot read image ({exc})") from None


def write_atomic(path: Path, write) -> None:
    """Call `write(file_object)` on a temporary file beside `path`, then rename it into place, so
    a crash or an interrupt never leaves a partial output."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_image(image: Image.Image, path: Path, format: str = "PNG", **params) -> None:
    write_atomic(path, lambda handle: image.save(handle, format=format, **params))
