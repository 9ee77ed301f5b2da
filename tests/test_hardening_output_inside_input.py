"""`-r` with `-o` inside the input folder, the cron layout the README supports: every later run
sees the earlier runs' outputs in its walk; they are neither inputs nor collisions, and the new
images dropped in the input folder get done."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from model_free import run_enlarge
from PIL import Image


def _photo(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)).save(path)
    return path


def test_cron_layout_keeps_working_run_after_run(capsys, tmp_path):
    photos = tmp_path / "in"
    out = photos / "out"
    _photo(photos / "a.png", 1)
    _photo(photos / "sub" / "b.png", 2)
    records, _, code = run_enlarge(capsys, [photos], out, recursive=True)
    assert code == 0 and {r["status"] for r in records.values()} == {"done"}
    first = {p: p.read_bytes() for p in out.rglob("*.png")}
    assert sorted(p.relative_to(out).as_posix() for p in first) == ["a.png", "sub/b.png"]

    # Run after run, each new image is done; the old outputs are neither inputs nor collisions.
    for run, new in enumerate(["c.png", "sub/d.png"], start=3):
        _photo(photos / new, run)
        records, summary, code = run_enlarge(capsys, [photos], out, recursive=True)
        assert code == 0, records
        assert records[str(photos / new)]["status"] == "done"
        assert summary["done"] == 1 and summary["collision"] == 0 and summary["failed"] == 0
        ours = {k: r for k, r in records.items() if Path(k).is_relative_to(out)}
        assert ours and all(r["status"] == "skipped" for r in ours.values()), ours
        assert records[str(photos / "a.png")] == {**records[str(photos / "a.png")], "status": "skipped"}
    assert all(p.read_bytes() == data for p, data in first.items())  # earlier outputs untouched
    assert not list(out.rglob("out"))  # no output of an output


def test_the_same_with_the_output_folder_as_the_input_folder(capsys, tmp_path):
    photos = tmp_path / "in"
    _photo(photos / "a.png", 1)
    for _ in range(2):
        records, summary, code = run_enlarge(capsys, [photos], photos, name="{stem}_x{scale}")
        assert code == 0 and summary["collision"] == 0, records
    assert records[str(photos / "a.png")]["reason"] == "output exists"
    assert sorted(p.name for p in photos.iterdir() if not p.name.startswith(".")) == ["a.png", "a_x2.png"]


def test_writing_over_a_real_input_is_still_a_collision(capsys, tmp_path):
    photos = tmp_path / "in"
    _photo(photos / "a.png", 1)
    before = (photos / "a.png").read_bytes()
    records, _, code = run_enlarge(capsys, [photos], photos, dry_run=True)
    assert code == 2 and records[str(photos / "a.png")]["status"] == "collision"
    assert run_enlarge(capsys, [photos], photos)[2] == 2
    assert (photos / "a.png").read_bytes() == before
