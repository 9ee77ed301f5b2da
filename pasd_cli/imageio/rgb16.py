"""16-bit RGB and RGBA files, which Pillow has no mode for: recognising them from the header,
reading their pixels at full precision (pypng for PNG, tifffile for TIFF) and writing them back.

The metadata of a 16-bit output is what Pillow's own writer makes for an 8-bit one with the same
parameters: Pillow renders it for a 1x1 image and the chunks (PNG) or tags (TIFF) are carried
over, so both depths keep the same EXIF, ICC, XMP, text and DPI.
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image, PngImagePlugin, TiffImagePlugin

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_EXIF_POINTERS = (0x8769, 0x8825)  # the Exif and GPS sub-directories of a TIFF's first IFD
_TIFF_POINTER_NAMES = {0x8769: "ExifTag", 0x8825: "GPSTag"}
# Tags tifffile writes itself from the pixels and its arguments; the rest come from Pillow.
_TIFF_OWN = {
    256,
    257,
    258,
    259,
    262,
    266,
    273,
    277,
    278,
    279,
    282,
    283,
    284,
    296,
    317,
    322,
    323,
    324,
    325,
    330,
    338,
    339,
    400,
    32997,
    32998,
    34665,
    34853,
    40965,
}


def is_rgb16(path, image: Image.Image) -> bool:
    """Whether the opened (not decoded) `image` is a 16-bit RGB or RGBA PNG or TIFF that Pillow
    would read at 8 bits: the PNG header's bit depth and colour type, the TIFF's tags."""
    if image.format == "PNG":
        with open(path, "rb") as handle:
            head = handle.read(26)
        # signature, IHDR length and type, width, height, bit depth, colour type (2 RGB, 6 RGBA)
        return head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR" and head[24] == 16 and head[25] in (2, 6)
    if image.format == "TIFF":
        tags = image.tag_v2  # type: ignore[attr-defined]
        bits, samples = tuple(tags.get(258, ())), tags.get(277, 1)
        return (
            tags.get(262) == 2
            and samples in (3, 4)
            and bits == (16,) * samples
            and _unsigned(tags.get(339))
            and tuple(tags.get(338, ())) in ((), (0,), (2,))
        )
    return False


def _unsigned(sample_format) -> bool:
    values = sample_format if isinstance(sample_format, tuple) else (sample_format,)
    return all(value in (None, 1) for value in values)


def read(path, fmt: str) -> np.ndarray:
    """The stored pixels of a file `is_rgb16` accepted: uint16, (height, width, 3 or 4)."""
    if fmt == "PNG":
        import png

        width, height, flat, info = png.Reader(filename=str(path)).read_flat()
        pixels = np.frombuffer(flat, dtype=np.uint16).reshape(height, width, info["planes"])
    else:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            pixels = page.asarray()
            if page.axes.startswith("S"):  # planar configuration "separate"
                pixels = np.moveaxis(pixels, 0, -1)
    if pixels.dtype != np.uint16 or pixels.ndim != 3 or pixels.shape[-1] not in (3, 4):
        raise ValueError(f"unexpected pixel layout {pixels.dtype} {pixels.shape}")
    return pixels


def orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """The stored pixels turned for display, as `ImageOps.exif_transpose` turns Pillow's."""
    turns = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
        8: lambda a: np.rot90(a, 1),
    }
    turn = turns.get(orientation)
    return np.ascontiguousarray(turn(pixels)) if turn else pixels


def write(handle, pixels: np.ndarray, fmt: str, params: dict) -> None:
    """Write uint16 RGB(A) `pixels` as a PNG or TIFF with the metadata Pillow's writer makes
    from `params` (the keyword arguments `Image.save` would get)."""
    if fmt == "PNG":
        _write_png(handle, pixels, params)
    else:
        _write_tiff(handle, pixels, params)


def _write_png(handle, pixels: np.ndarray, params: dict) -> None:
    import png

    height, width, planes = pixels.shape
    rows = pixels.astype(">u2").reshape(height, width * planes)  # PNG samples are big-endian
    encoded = io.BytesIO()
    png.Writer(width, height, greyscale=False, alpha=planes == 4, bitdepth=16, compression=6).write_packed(
        encoded, (row.tobytes() for row in rows)
    )
    image_chunks = list(png.Reader(bytes=encoded.getvalue()).chunks())  # IHDR, IDAT..., IEND
    meta = [
        (cid, data)
        for cid, data, _ in PngImagePlugin.getchunks(Image.new("RGB", (1, 1)), **params)
        if cid not in (b"IHDR", b"IDAT", b"IEND")
    ]
    png.write_chunks(handle, [image_chunks[0], *meta, *image_chunks[1:]])


def _write_tiff(handle, pixels: np.ndarray, params: dict) -> None:
    import tifffile

    exif = params.get("tiffinfo")
    rendered = io.BytesIO()  # Pillow's own writer: it keeps EXIF sub-directories
    Image.new("RGB", (1, 1)).save(rendered, "TIFF", **{**params, "compression": None})
    rendered.seek(0)
    with tifffile.TiffFile(rendered) as tif:
        tags = {tag.code: tag for tag in tif.pages[0].tags.values()}
    extratags = [(code, tag.dtype, tag.count, tag.value, True) for code, tag in tags.items() if code not in _TIFF_OWN]
    pointers = {code: _sub_ifd(exif, code) for code in _EXIF_POINTERS if exif is not None and code in exif}
    pointers = {code: ifd for code, ifd in pointers.items() if ifd}
    # tifffile writes no IFD-typed tags: a LONG placeholder by name, pointed at the sub-directory below.
    extratags += [(_TIFF_POINTER_NAMES[code], 4, 1, 0, True) for code in pointers]
    resolution = {}
    if 282 in tags and 283 in tags:
        resolution = {
            "resolution": (tags[282].value, tags[283].value),
            "resolutionunit": tags[296].value if 296 in tags else 2,
        }
    encoded = io.BytesIO()
    tifffile.imwrite(
        encoded,
        pixels,
        byteorder="<",
        photometric="rgb",
        compression="zlib",
        extrasamples=("unassalpha",) if pixels.shape[-1] == 4 else None,
        metadata=None,
        software=False,
        extratags=extratags,
        **resolution,
    )
    data = bytearray(encoded.getvalue())
    if pointers:
        data += b"\0" * (len(data) % 2)
        _append_sub_ifds(data, pointers)
    handle.write(data)


def _sub_ifd(exif: Image.Exif, code: int) -> dict:
    ifd = dict(exif.get_ifd(code))
    if code == 0x8769 and 0xA005 in ifd:  # the Interoperability directory inside the Exif one
        interop = exif.get_ifd(0xA005)
        if interop:
            ifd[0xA005] = dict(interop)
        else:
            del ifd[0xA005]
    return ifd


def _append_sub_ifds(data: bytearray, pointers: dict[int, dict]) -> None:
    """Serialise the sub-directories (Pillow's IFD writer) at the end of `data`, a little-endian
    classic TIFF, and point the placeholder entries of its first IFD at them."""
    holder = TiffImagePlugin.ImageFileDirectory_v2(prefix=b"II")
    for code, ifd in pointers.items():
        holder[code] = ifd
    position = len(data)
    blob = holder.tobytes(position)  # an unreferenced IFD whose entries point at the sub-directories
    offsets = {tag: value for tag, value in _ifd_entries(blob, 0)}
    first = struct.unpack_from("<I", data, 4)[0]
    (count,) = struct.unpack_from("<H", data, first)
    for index in range(count):
        entry = first + 2 + 12 * index
        tag = struct.unpack_from("<H", data, entry)[0]
        if tag in offsets:
            struct.pack_into("<I", data, entry + 8, offsets[tag])
    data += blob


def _ifd_entries(blob: bytes, start: int):
    (count,) = struct.unpack_from("<H", blob, start)
    for index in range(count):
        tag, _, _, value = struct.unpack_from("<HHII", blob, start + 2 + 12 * index)
        yield tag, value
