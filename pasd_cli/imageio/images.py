"""Reading inputs (header probes, EXIF orientation, ICC, alpha, gray, 16-bit) and encoding results
with their metadata (the caller puts them in place, with `atomic.write_atomic`).

The models see 8-bit RGB only. `load` splits an input into what the model sees and what it does
not (alpha, gray-ness, 16-bit precision, metadata); `restore` puts the model's output back into
the input's kind of image.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from ..errors import InputError, ReadError
from . import metadata
from . import rgb16 as deep
from .formats import DEFAULT_QUALITY, MAX_INPUT_PIXELS, OTHER_IMAGE_SUFFIXES, OUTPUT_FORMATS, READ_FORMATS, SAME_FORMAT

_READ = f" (only {', '.join(READ_FORMATS)})"


@dataclass(frozen=True)
class ImageInfo:
    """What the header says, without decoding pixels."""

    format: str  # one of READ_FORMATS
    size: tuple[int, int]  # as displayed, EXIF orientation applied
    by_pasd: bool  # carries pasd's own record: an output of an earlier run


def _orientation(image: Image.Image) -> int:
    try:
        return image.getexif().get(0x0112, 1)
    except Exception:  # a damaged EXIF block must not make the image unreadable
        return 1


def _orientation_swaps(image: Image.Image) -> bool:
    return _orientation(image) in (5, 6, 7, 8)


def _size_turned_on_open(image: Image.Image) -> bool:
    """Pillow's TIFF reader turns the image by its orientation tag as it opens it: its size is
    then the stored width and height swapped."""
    if image.format != "TIFF":
        return False
    stored = (image.tag_v2.get(256), image.tag_v2.get(257))  # type: ignore[attr-defined]
    return image.size != stored


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info
    )


def _open(path: Path) -> Image.Image:
    """Open lazily (header only) with one-line reasons for everything that is not a usable image."""
    try:
        if path.stat().st_size == 0:
            raise InputError(f"{path}: empty file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except FileNotFoundError:
        raise ReadError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ReadError(f"{path}: is a folder") from None
    except PermissionError:
        raise ReadError(f"{path}: permission denied") from None
    except Image.DecompressionBombError as exc:
        claimed = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{int(claimed.group(1)) / 1e6:.0f} MP" if claimed else "too many pixels"
        raise InputError(f"{path}: header claims {pixels}; not decoded (Pillow's decompression-bomb guard)") from None
    except UnidentifiedImageError:
        if path.suffix.lower() in OTHER_IMAGE_SUFFIXES:
            raise InputError(f"{path}: {path.suffix[1:].upper()} images are not supported{_READ}") from None
        raise InputError(f"{path}: not an image (content not recognised)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        _raise_if_io(path, exc)
        raise InputError(f"{path}: unreadable image header ({exc})") from None
    if image.format not in READ_FORMATS and image.format != "MPO":
        image.close()
        raise InputError(f"{path}: {image.format} images are not supported{_READ}")
    width, height = image.size
    if width * height > MAX_INPUT_PIXELS:
        image.close()
        raise InputError(
            f"{path}: {width}x{height} pixels ({width * height / 1e6:.0f} MP) is above the "
            f"{MAX_INPUT_PIXELS / 1e6:.0f} MP input limit; not decoded"
        )
    # Phone and camera JPEGs often carry a second, preview picture (MPO); the first is the photo.
    if getattr(image, "n_frames", 1) > 1 and image.format != "MPO":
        image.close()
        frames = getattr(image, "n_frames", 1)
        raise InputError(f"{path}: has {frames} frames or pages; only single images are supported")
    if image.mode == "F":
        image.close()
        raise InputError(f"{path}: 32-bit float images are not supported")
    return image


def _raise_if_io(path: Path, exc: BaseException) -> None:
    """An OSError from the system (it has an errno: EIO, EACCES, ...) is about reading the file,
    not about its content; Pillow's own decoding errors are OSErrors without one."""
    if isinstance(exc, OSError) and exc.errno is not None:
        raise ReadError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _format(image: Image.Image) -> str:
    return "JPEG" if image.format == "MPO" else str(image.format)


def probe(path: Path) -> ImageInfo:
    """Identify an input from its header; `InputError` with the reason when it is not usable."""
    with _open(Path(path)) as image:
        width, height = image.size
        if _orientation_swaps(image) and not _size_turned_on_open(image):
            width, height = height, width
        return ImageInfo(_format(image), (width, height), metadata.is_pasd_output(image.info))


@dataclass(frozen=True)
class RGB16:
    """16-bit RGB or RGBA pixels, which Pillow has no mode for; `restore` makes them and `encode`
    writes them (PNG, TIFF) or makes them 8-bit (the other formats)."""

    pixels: np.ndarray  # uint16, (height, width, 3 or 4)

    @property
    def size(self) -> tuple[int, int]:
        return self.pixels.shape[1], self.pixels.shape[0]

    @property
    def mode(self) -> str:
        return "RGBA" if self.pixels.shape[-1] == 4 else "RGB"

    def to_8bit(self) -> Image.Image:
        return Image.fromarray(_to8(self.pixels), self.mode)


def bits(image: Image.Image | RGB16) -> int:
    """Bits per sample of what `encode` wrote."""
    return 16 if isinstance(image, RGB16) or image.mode == "I;16" else 8


@dataclass
class LoadedImage:
    rgb: Image.Image  # 8-bit RGB, orientation applied: what the model sees
    gray: bool = False
    # The full-precision pixels of a 16-bit input, orientation applied: (h, w) gray, (h, w, 3) RGB.
    pixels16: np.ndarray | None = None
    alpha: Image.Image | None = None  # "L"
    alpha16: np.ndarray | None = None  # a 16-bit RGBA input's alpha at full precision
    icc: bytes | None = None
    exif: Image.Exif | None = None  # orientation removed
    xmp: bytes | None = None
    dpi: tuple | None = None
    png_text: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def load(path: Path) -> LoadedImage:
    """Decode an input fully, apply its EXIF orientation and split it into model input and the rest."""
    path = Path(path)
    notes: list[str] = []
    with _open(path) as opened:
        exif = _exif_without_orientation(opened, notes)  # a transposed copy would lose a TIFF's tags
        orientation = _orientation(opened)  # before decoding: Pillow turns a TIFF as it decodes it
        try:
            image = ImageOps.exif_transpose(opened)  # also removes the orientation from XMP
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            _raise_if_io(path, exc)
            raise InputError(f"{path}: cannot decode ({exc})") from None
        xmp = image.info.get("xmp") or image.info.get(metadata.XMP_PNG_KEY)
        loaded = LoadedImage(
            rgb=image,
            icc=image.info.get("icc_profile"),
            exif=exif,
            xmp=xmp.encode("utf-8") if isinstance(xmp, str) else xmp,
            dpi=image.info.get("dpi"),
            notes=notes,
        )
        if opened.format == "PNG":
            loaded.png_text = {k: v for k, v in opened.text.items() if isinstance(v, str)}  # type: ignore[attr-defined]
        rgb16 = _read_rgb16(path, opened, orientation, image.size, notes) if deep.is_rgb16(path, opened) else None
    _split_channels(image, loaded, rgb16)
    return loaded


def _read_rgb16(
    path: Path, opened: Image.Image, orientation: int, size: tuple[int, int], notes: list[str]
) -> np.ndarray | None:
    """A 16-bit RGB(A) PNG or TIFF at full precision, orientation applied; None (Pillow's 8 bits
    are used, with a note) when the extra reader cannot decode it, such as an LZW-compressed TIFF,
    which tifffile reads only with imagecodecs installed."""
    try:
        pixels = deep.read(path, _format(opened))
    except Exception as exc:  # any reader failure leaves the 8-bit decode, which worked
        notes.append(f"16-bit pixels unreadable ({exc}); read as 8-bit")
        return None
    pixels = deep.orient(pixels, orientation)
    if (pixels.shape[1], pixels.shape[0]) != size:
        notes.append("16-bit pixels do not match the image's size; read as 8-bit")
        return None
    return pixels


def _exif_without_orientation(image: Image.Image, notes: list[str]) -> Image.Exif | None:
    try:
        exif = Image.Exif()
        exif.load(image.getexif().tobytes())
    except Exception:  # keep the pixels even when the EXIF block is damaged
        notes.append("damaged EXIF dropped")
        return None
    exif.pop(0x0112, None)
    return exif if len(exif) else None


def _split_channels(image: Image.Image, loaded: LoadedImage, rgb16: np.ndarray | None = None) -> None:
    mode = image.mode
    if _has_alpha(image):
        loaded.alpha = image.convert("RGBA").getchannel("A")
        if rgb16 is not None and rgb16.shape[-1] == 4:
            loaded.alpha16 = rgb16[..., 3]
            loaded.alpha = Image.fromarray(_to8(loaded.alpha16))
        image = image.convert("L" if mode in ("L", "LA", "La") else "RGB")
        mode = image.mode
    if rgb16 is not None:
        loaded.pixels16 = rgb16[..., :3]
        loaded.rgb = Image.fromarray(_to8(loaded.pixels16))
    elif mode in ("1", "L"):
        loaded.gray = True
        loaded.rgb = image.convert("L").convert("RGB")
    elif mode.startswith("I"):
        pixels = np.clip(np.asarray(image, dtype=np.int64), 0, 65535).astype(np.uint16)
        loaded.gray, loaded.pixels16 = True, pixels
        loaded.rgb = Image.fromarray(_to8(pixels)).convert("RGB")
    elif mode == "CMYK":
        loaded.rgb = _cmyk_to_rgb(image, loaded)
    else:
        loaded.rgb = image.convert("RGB")
        if mode not in ("RGB", "RGBA", "RGBX", "P", "PA"):
            loaded.icc = None  # a profile for another colour space does not describe RGB pixels


def _cmyk_to_rgb(image: Image.Image, loaded: LoadedImage) -> Image.Image:
    """Through the embedded CMYK profile to sRGB when there is one; Pillow's formula otherwise."""
    if loaded.icc:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(loaded.icc))
            srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
            rgb = ImageCms.profileToProfile(image, source, srgb, outputMode="RGB")
            if rgb is not None:  # None only when converting in place
                loaded.icc = srgb.tobytes()
                return rgb
        except (ImageCms.PyCMSError, OSError):
            loaded.notes.append("CMYK profile unusable; converted without it")
    loaded.icc = None
    return image.convert("RGB")


def restore(result: Image.Image, loaded: LoadedImage) -> Image.Image | RGB16:
    """The model's 8-bit RGB output back into the input's kind: gray stays gray, 16-bit stays
    16-bit, alpha (enlarged on its own, bicubic; at 16 bits when it was) is re-attached."""
    size = result.size
    if loaded.pixels16 is not None and loaded.gray:
        image = Image.fromarray(_deepen(np.asarray(result.convert("L")), loaded.pixels16, size))  # I;16
    elif loaded.pixels16 is not None:
        rgb16 = _deepen(np.asarray(result.convert("RGB")), loaded.pixels16, size)
        if loaded.alpha is None:
            return RGB16(rgb16)
        if loaded.alpha16 is not None:
            alpha16 = _enlarge(loaded.alpha16.astype(np.float32), size)
        else:
            alpha16 = _enlarge(np.asarray(loaded.alpha, dtype=np.float32), size) * 257
        return RGB16(np.dstack([rgb16, _to16(alpha16)]))
    elif loaded.gray:
        image = result.convert("L")
    else:
        image = result.convert("RGB")
    if loaded.alpha is not None:
        alpha = loaded.alpha.resize(size, Image.Resampling.BICUBIC)
        if image.mode == "I;16":  # no 16-bit gray+alpha mode in Pillow
            image = Image.fromarray(_to8(np.asarray(image)))
            loaded.notes.append("16-bit gray with alpha written as 8-bit")
        image = image.convert("LA" if image.mode == "L" else "RGBA")
        image.putalpha(alpha)
    return image


def _deepen(result8: np.ndarray, source16: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """16-bit pixels from the model's 8-bit result plus the input's sub-8-bit detail, enlarged, per
    channel: otherwise smooth 16-bit gradients would come back with 8-bit banding. `result8` is
    (h, w) or (h, w, c) at `size`; `source16` the input's (full-precision) pixels of the same shape."""
    fine = source16.astype(np.float32) - np.round(source16 / 257).astype(np.float32) * 257
    if fine.ndim == 2:
        fine_big = _enlarge(fine, size)
    else:
        fine_big = np.dstack([_enlarge(fine[..., c], size) for c in range(fine.shape[-1])])
    return _to16(result8.astype(np.float32) * 257 + fine_big)


def _enlarge(channel: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One float32 channel resized to `size`, bicubic."""
    return np.asarray(
        Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32)).resize(size, Image.Resampling.BICUBIC)
    )


def _to16(values: np.ndarray) -> np.ndarray:
    return np.clip(np.round(values), 0, 65535).astype(np.uint16)


def _to8(pixels16: np.ndarray) -> np.ndarray:
    return np.round(pixels16 / 257).astype(np.uint8)


def output_format(name: str, info: ImageInfo | None) -> str:
    """The `--format` value, with `same` resolved against the input's real format."""
    if name != "same":
        return name
    return SAME_FORMAT[info.format] if info is not None else "png"


def encode(
    image: Image.Image | RGB16, handle, fmt: str, loaded: LoadedImage, record: dict, quality: int | None = None
) -> Image.Image | RGB16:
    """Write `image` as `fmt` with the input's metadata and pasd's `record`; returns what was written
    (after conversions the format forces)."""
    spec = OUTPUT_FORMATS[fmt]
    if isinstance(image, RGB16) and not spec.bits16:
        image = image.to_8bit()
    if not isinstance(image, RGB16) and image.mode == "I;16" and not spec.bits16:
        image = Image.fromarray(_to8(np.asarray(image)))
    if isinstance(image, Image.Image) and image.mode in ("RGBA", "LA") and not spec.alpha:  # PNG, TIFF have alpha
        background = Image.new(image.mode[:-1], image.size, "white")
        background.paste(image.convert(image.mode[:-1]), mask=image.getchannel("A"))
        image = background
        loaded.notes.append(f"alpha flattened onto white ({fmt} has no alpha)")
    exif = metadata.output_exif(loaded.exif, image.size)
    xmp = metadata.output_xmp(loaded.xmp, image.size, record)
    params: dict = {"exif": exif}
    if loaded.icc:
        params["icc_profile"] = loaded.icc
    if loaded.dpi:
        params["dpi"] = loaded.dpi
    if fmt == "png":
        params["pnginfo"] = metadata.png_info(loaded.png_text, xmp, record)
    elif fmt == "tiff":
        exif[metadata.XMP_TIFF_TAG] = xmp
        # libtiff (which compresses) cannot write EXIF sub-directories; Pillow's own writer can,
        # uncompressed. Keeping the metadata wins over the file size.
        keeps_sub_ifds = any(tag in exif for tag in metadata.SUB_IFDS)
        params.update(tiffinfo=params.pop("exif"), compression=None if keeps_sub_ifds else "tiff_deflate")
    else:
        params.update(xmp=xmp, quality=quality or DEFAULT_QUALITY[fmt])
        if fmt == "jpg" and params["quality"] >= 90:
            params["subsampling"] = 0  # 4:4:4: chroma subsampling would blur the restored detail
    if isinstance(image, RGB16):
        deep.write(handle, image.pixels, spec.pillow, params)
    else:
        image.save(handle, format=spec.pillow, **params)
    return image


def read_rgb(path: Path) -> Image.Image:
    """An 8-bit RGB image with its EXIF orientation applied; one-line errors for bad files."""
    return load(path).rgb
