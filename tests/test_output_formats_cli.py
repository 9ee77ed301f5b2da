"""`--format jpg|webp|tiff` and `--quality` through the real `pasd upscale` command (README, batch
options table): the file written has the format's extension and really is that format, and a lower
quality gives a smaller JPEG or WebP of the same result. Each run loads the tiny model once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import pasd_here, tiny_model_args
from PIL import Image

from pasd_cli.imageio.metadata import read_record

MODEL = [*tiny_model_args(), "--device", "cpu", "--dtype", "fp32", "--caption", "none"]
FAST = ["--scale", "2", "--steps", "1", "--guidance", "1", "--process-size", "16"]
PILLOW = {"jpg": "JPEG", "webp": "WEBP", "tiff": "TIFF"}


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """encoded(fmt, quality) -> (the file written, its JSON record); each pair is run once."""
    root = tmp_path_factory.mktemp("formats")
    photo = root / "photo.png"
    # Detail everywhere, so that the quality setting has something to throw away.
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(photo)
    runs: dict = {}

    def run(fmt: str, quality: int | None = None) -> tuple[Path, dict]:
        if (fmt, quality) not in runs:
            out = root / f"{fmt}-{quality}"
            extra = [] if quality is None else ["--quality", str(quality)]
            proc = pasd_here("upscale", photo, "-o", out, "--format", fmt, *extra, "--json", *FAST, *MODEL)
            assert proc.returncode == 0, proc.stderr
            record = json.loads(proc.stdout.splitlines()[0])
            assert record["status"] == "done", record
            runs[fmt, quality] = (Path(record["output"]), record)
        return runs[fmt, quality]

    return run


@pytest.mark.parametrize("fmt", ["jpg", "webp", "tiff"])
def test_format_option_writes_that_format_with_its_extension(encoded, fmt):
    written, record = encoded(fmt)
    assert written.name == f"photo.{fmt}" and written.is_file()
    assert sorted(p.name for p in written.parent.iterdir()) == [f"photo.{fmt}"]  # no PNG beside it
    with Image.open(written) as image:
        assert image.format == PILLOW[fmt]
        assert image.size == (48, 48) and record["output_size"] == [48, 48]
        assert read_record(image)["settings"]["steps"] == 1  # pasd's record travels in every format


@pytest.mark.parametrize("fmt", ["jpg", "webp"])
def test_lower_quality_gives_a_smaller_file(encoded, fmt):
    high, _ = encoded(fmt)  # the default, 95
    low, _ = encoded(fmt, 20)
    with Image.open(low) as image:
        assert image.format == PILLOW[fmt]
        low_pixels = np.asarray(image.convert("RGB")).astype(int)
    with Image.open(high) as image:
        high_pixels = np.asarray(image.convert("RGB")).astype(int)
    assert low.stat().st_size < 0.8 * high.stat().st_size, (low.stat().st_size, high.stat().st_size)
    # The same result underneath: the two encodings differ only by compression loss.
    assert np.abs(low_pixels - high_pixels).mean() < 40
