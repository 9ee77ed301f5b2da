"""Metadata carried from an input to its output (EXIF, XMP, PNG text), with sizes made true for the
enlarged image, plus pasd's own record of how the output was made.

pasd's record is a JSON object (settings, model identity, anything a command adds such as the
prompt). It goes into a PNG text chunk named `pasd` and, in every format, into an XMP
`rdf:Description` in pasd's namespace, so any XMP reader (exiftool, Lightroom) shows it.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from xml.sax.saxutils import quoteattr

from PIL import Image, PngImagePlugin

PASD_NS = "urn:x-pasd:1.0/"
PNG_KEY = "pasd"
XMP_PNG_KEY = "XML:com.adobe.xmp"

_EXIF_IFD = 0x8769
SUB_IFDS = (0x8769, 0x8825, 0xA005)  # Exif, GPS, Interoperability
_SOFTWARE = 0x0131
_PIXEL_X, _PIXEL_Y = 0xA002, 0xA003
XMP_TIFF_TAG = 700
# TIFF layout tags (sizes, strips, compression, sample format, ICC and XMP blocks): a TIFF input's
# EXIF holds them, but they describe the input's encoding, not the output's.
_LAYOUT_TAGS = {
    254,
    255,
    256,
    257,
    258,
    259,
    262,
    273,
    277,
    278,
    279,
    284,
    317,
    320,
    322,
    323,
    324,
    325,
    338,
    339,
    347,
    529,
    530,
    531,
    532,
    XMP_TIFF_TAG,
    34675,
}

_NEW_XMP = (
    '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
    '<x:xmpmeta xmlns:x="adobe:ns:meta/">'
    '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    '</rdf:RDF></x:xmpmeta>\n<?xpacket end="w"?>'
)
_OUR_XMP = re.compile(r'\s*<rdf:Description[^>]*xmlns:pasd="' + re.escape(PASD_NS) + r'"[^>]*/>')
_XMP_SIZES = (("exif:PixelXDimension", 0), ("exif:PixelYDimension", 1), ("tiff:ImageWidth", 0), ("tiff:ImageLength", 1))


@lru_cache(maxsize=1)
def software() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"pasd {version('pasd')}"
    except PackageNotFoundError:
        return "pasd"


def is_pasd_output(info: dict) -> bool:
    """Whether Pillow's `info` of an opened file shows pasd's own record (from the header alone)."""
    if PNG_KEY in info:
        return True
    xmp = info.get("xmp") or info.get(XMP_PNG_KEY) or b""
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8", "replace")
    return f'xmlns:pasd="{PASD_NS}"'.encode() in xmp


def output_exif(exif: Image.Exif | None, size: tuple[int, int]) -> Image.Exif:
    """The input's EXIF (orientation already removed by the reader) with the pixel sizes of the
    output and pasd as the software."""
    out = Image.Exif()
    if exif is not None:
        out.load(exif.tobytes())
    for tag in _LAYOUT_TAGS & set(out):
        del out[tag]
    if _EXIF_IFD in out:
        sub = out.get_ifd(_EXIF_IFD)
        for tag, value in ((_PIXEL_X, size[0]), (_PIXEL_Y, size[1])):
            if tag in sub:
                sub[tag] = value
    out[_SOFTWARE] = software()
    return out


def output_xmp(xmp: bytes | str | None, size: tuple[int, int], record: dict) -> bytes:
    """The input's XMP packet (or a new one) with sizes updated and pasd's record added."""
    text = xmp.decode("utf-8", "replace") if isinstance(xmp, bytes) else (xmp or "")
    if "</rdf:RDF>" not in text:
        text = _NEW_XMP
    for name, axis in _XMP_SIZES:
        text = re.sub(rf'({re.escape(name)}=")\d+(")', rf"\g<1>{size[axis]}\2", text)
        text = re.sub(rf"(<{re.escape(name)}>)\d+(</{re.escape(name)}>)", rf"\g<1>{size[axis]}\2", text)
    text = _OUR_XMP.sub("", text)
    ours = (
        f'<rdf:Description rdf:about="" xmlns:pasd="{PASD_NS}" '
        f"pasd:software={_attr(software())} pasd:record={_attr(record_json(record))}/>"
    )
    head, tail = text.rsplit("</rdf:RDF>", 1)
    return (head + ours + "</rdf:RDF>" + tail).encode("utf-8")


def _attr(value: str) -> str:
    # Always double quotes, so readers can find the value with one pattern.
    return quoteattr(value, {'"': "&quot;"})


def record_json(record: dict) -> str:
    return json.dumps(record, sort_keys=True, ensure_ascii=False, default=str)


def png_info(source_text: dict[str, str], xmp: bytes, record: dict) -> PngImagePlugin.PngInfo:
    """PNG text chunks: the input's own (when it was a PNG), pasd's record and the XMP packet."""
    info = PngImagePlugin.PngInfo()
    for key, value in source_text.items():
        if key not in (PNG_KEY, XMP_PNG_KEY, "Software") and isinstance(value, str):
            info.add_itxt(key, value)
    info.add_text("Software", software())
    info.add_itxt(PNG_KEY, record_json(record))
    info.add_itxt(XMP_PNG_KEY, xmp.decode("utf-8"))
    return info


def read_record(image: Image.Image) -> dict | None:
    """pasd's record from an opened output file (PNG text chunk, else XMP), or None."""
    if PNG_KEY in image.info:
        return json.loads(image.info[PNG_KEY])
    xmp = image.info.get("xmp") or image.info.get(XMP_PNG_KEY)
    if isinstance(xmp, bytes):
        xmp = xmp.decode("utf-8", "replace")
    match = re.search(r'pasd:record="([^"]*)"', xmp or "")
    if not match:
        return None
    from html import unescape

    return json.loads(unescape(match.group(1)))
