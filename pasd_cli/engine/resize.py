"""Image sizes of the released pipeline (spec section 4, steps 2 and 10)."""

from __future__ import annotations

from PIL import Image

from ..errors import InputError


def output_size(lr_size: tuple[int, int], scale: float) -> tuple[int, int]:
    width, height = lr_size
    return max(1, round(width * scale)), max(1, round(height * scale))


def _short_side_to(width: int, height: int, short: int) -> tuple[int, int]:
    # torchvision's Resize(int) rule, which the released script used: long side truncated.
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def working_size(lr_size: tuple[int, int], scale: float, process_size: int) -> tuple[int, int]:
    """The size of `make_hint`'s image, from the sizes alone: what the model works on."""
    width, height = output_size(lr_size, scale)
    if min(width, height) < process_size:
        width, height = _short_side_to(width, height, process_size)
    return width // 8 * 8, height // 8 * 8


def colorize_size(size: tuple[int, int], process_size: int) -> tuple[int, int]:
    """The released resize_preproc size, torchvision's `Resize(P, max_size=2P)` arithmetic:
    short side to P, long side truncated; when that exceeds 2P the long side becomes 2P and the
    short one shrinks in proportion (truncated). Applied whatever the input size, so inputs
    larger than P are reduced."""
    width, height = size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = process_size, int(process_size * long / short)
    if new_long > 2 * process_size:
        new_short, new_long = int(2 * process_size * new_short / new_long), 2 * process_size
    return (new_short, new_long) if width <= height else (new_long, new_short)


def colorize_working_size(size: tuple[int, int], process_size: int) -> tuple[int, int]:
    """The size of the colorization hint (`colorize.colorize_hint`), from the sizes alone."""
    width, height = colorize_size(size, process_size)
    return width // 8 * 8, height // 8 * 8


def make_hint(lr_image: Image.Image, scale: float, process_size: int) -> Image.Image:
    """The ControlNet hint, VAE input and colour reference: upscale, enlarge to the process size,
    crop the size down to multiples of 8 by resizing, as released."""
    image = lr_image.resize(output_size(lr_image.size, scale), Image.Resampling.BICUBIC)
    if min(image.size) < process_size:
        image = image.resize(_short_side_to(*image.size, process_size), Image.Resampling.BILINEAR)
    width, height = image.size
    if width < 8 or height < 8:
        raise InputError(
            f"image of {width}x{height} px is too small after scaling", hint="use a larger scale or process size"
        )
    return image.resize((width // 8 * 8, height // 8 * 8), Image.Resampling.BICUBIC)


def final_resize(image: Image.Image, lr_size: tuple[int, int], scale: float) -> Image.Image:
    size = output_size(lr_size, scale)
    return image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)
