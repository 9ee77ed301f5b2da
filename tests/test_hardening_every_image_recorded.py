"""Every image a folder walk finds gets a record: processed, or refused with its reason (a GIF,
still or animated, a HEIC, ...). Only files that are not images at all are left out, and -v
lists them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from model_free import run_enlarge
from PIL import Image

from pasd_cli.batch.failures import FailureLog


def _pixels(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8))


def test_unsupported_images_are_refused_with_a_reason_and_other_files_left_out(capsys, tmp_path):
    photos = tmp_path / "in"
    photos.mkdir()
    _pixels().save(photos / "a.png")
    _pixels(1).save(photos / "still.gif")
    frames = [_pixels(i).convert("P") for i in range(3)]
    frames[0].save(photos / "animated.GIF", save_all=True, append_images=frames[1:])
    (photos / "phone.heic").write_bytes(b"\0\0\0\x18ftypheic" + b"\0" * 64)  # Pillow cannot read it
    _pixels(2).save(photos / "scan.jfif", "JPEG")  # a JPEG by another name: read
    (photos / "notes.txt").write_text("not an image")
    (photos / "archive.zip").write_bytes(b"PK\x03\x04")
    out = tmp_path / "out"
    records, summary, code = run_enlarge(capsys, [photos], out)
    names = {Path(k).name: r for k, r in records.items()}
    assert sorted(names) == ["a.png", "animated.GIF", "phone.heic", "scan.jfif", "still.gif"]
    assert names["a.png"]["status"] == names["scan.jfif"]["status"] == "done"
    assert (out / "scan.png").is_file()
    for name, kind in (("still.gif", "GIF"), ("animated.GIF", "GIF"), ("phone.heic", "HEIC")):
        assert names[name]["status"] == "failed", names[name]
        assert f"{kind} images are not supported" in names[name]["reason"]
    assert summary["total"] == 5 and code == 1
    # A cron run reports them once: they are remembered as refused for their content.
    log = FailureLog(out)
    assert all(log.known(photos / n) for n in ("still.gif", "animated.GIF", "phone.heic"))
    records, summary, code = run_enlarge(capsys, [photos], out)
    assert code == 0 and summary["total"] == 5 and summary["skipped"] == 5


def test_files_that_are_not_images_are_listed_with_v(capsys, tmp_path):
    from io import StringIO

    from model_free import Enlarge

    from pasd_cli.batch.runner import run_batch
    from pasd_cli.batch.settings import BatchSettings

    photos = tmp_path / "in"
    photos.mkdir()
    _pixels().save(photos / "a.png")
    (photos / "notes.txt").write_text("not an image")
    batch = BatchSettings(inputs=(str(photos),), output=str(tmp_path / "out"), verbosity=2, dry_run=True)
    run_batch(Enlarge(batch), batch, stdin=StringIO())
    assert f"ignore {photos / 'notes.txt'}: not an image file name" in capsys.readouterr().err
