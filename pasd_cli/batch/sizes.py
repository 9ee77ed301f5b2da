"""The pixel limit. Each job is planned, from its header alone, at two sizes: its output and the
working image the model runs on (the output size enlarged to the process size: a 5000x3 strip at
--scale 4 and --process-size 768 is a 1,280,000x768 working image, about a gigapixel). A job that
passes the limit on either is refused before anything is decoded, with the reason, and the
refusal is remembered like a broken file; a run with a higher limit or smaller sizes tries it
again."""

from __future__ import annotations

# 64 MP, the input limit too (imageio.MAX_INPUT_PIXELS): an 8000x8000 image. The released
# model takes over two minutes for a 4 MP output on a desktop GPU, so this is hours of work.
DEFAULT_MAX_PIXELS = 64_000_000
_ABOVE = "is above the pixel limit"

Size = tuple[int, int]


def pixels(count: int) -> str:
    """1_280_000 -> "1.28 MP", for messages."""
    return f"{count / 1e6:.3g} MP" if count >= 1_000_000 else f"{count} pixels"


def size_refusal(output: Size | None, working: Size | None, limit: int) -> str | None:
    """Why a job of these sizes is refused, or None when both are within `limit` pixels."""
    for what, size in (("working size", working), ("output size", output)):
        if size is not None and size[0] * size[1] > limit:
            return (
                f"{what} {size[0]}x{size[1]} ({pixels(size[0] * size[1])}) {_ABOVE} of {pixels(limit)}; "
                "raise it with --max-pixels, or lower --scale or --process-size"
            )
    return None


def is_size_refusal(reason: str) -> bool:
    """Whether a remembered failure was the pixel limit's, to be checked again at each run."""
    return _ABOVE in reason
