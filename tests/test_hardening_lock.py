"""`--lock FILE` (filelock's flock): it never writes into a file it did not make and never follows
a symbolic link, dry run or not; a path that is not a lock is a usage error (exit 2)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from conftest import run_pasd
from model_free import run_enlarge
from PIL import Image

from pasd_cli.batch.lock import hold_lock


def _photo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_lock_pointed_at_an_image_refuses_and_leaves_it_intact(capsys, tmp_path, dry_run):
    photo = _photo(tmp_path / "in" / "a.png")
    before = _digest(photo)
    records, _, code = run_enlarge(capsys, [photo], tmp_path / "out", lock=str(photo), dry_run=dry_run)
    assert code == 2 and not records
    assert _digest(photo) == before
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target_exists", [True, False])
def test_a_symlink_is_never_followed(capsys, tmp_path, target_exists):
    photo = _photo(tmp_path / "in" / "a.png")
    target = tmp_path / "elsewhere" / ("victim.txt" if target_exists else "made.txt")
    target.parent.mkdir()
    if target_exists:
        target.write_bytes(b"")  # even an empty file behind a link is not ours to lock
    link = tmp_path / "pasd.lock"
    link.symlink_to(target)
    _, _, code = run_enlarge(capsys, [photo], tmp_path / "out", lock=str(link), dry_run=True)
    assert code == 2
    assert link.is_symlink() and target.exists() == target_exists
    if target_exists:
        assert target.read_bytes() == b""


def test_a_folder_or_a_missing_folder_is_refused(capsys, tmp_path):
    photo = _photo(tmp_path / "in" / "a.png")
    for lock in (tmp_path / "in", tmp_path / "nowhere" / "pasd.lock"):
        assert run_enlarge(capsys, [photo], tmp_path / "out", lock=str(lock), dry_run=True)[2] == 2
    assert not (tmp_path / "nowhere").exists()


def test_a_fresh_lock_is_made_empty_taken_again_and_refuses_a_second_holder(capsys, tmp_path):
    photo = _photo(tmp_path / "in" / "a.png")
    lock = tmp_path / "pasd.lock"
    records, _, code = run_enlarge(capsys, [photo], tmp_path / "out", lock=str(lock))
    assert code == 0 and lock.is_file() and lock.read_bytes() == b""
    with hold_lock(lock):  # another run holds it: exit 4, nothing done
        records, _, code = run_enlarge(capsys, [photo], tmp_path / "out2", lock=str(lock))
        assert code == 4 and not records and not (tmp_path / "out2").exists()
    # The lock an earlier run left behind is taken again.
    assert run_enlarge(capsys, [photo], tmp_path / "out2", lock=str(lock))[2] == 0
    assert lock.read_bytes() == b""


def test_the_command_line_says_why(tmp_path):
    photo = _photo(tmp_path / "a.png")
    before = _digest(photo)
    proc = run_pasd("upscale", photo, "-o", tmp_path / "out", "--lock", photo, "--dry-run")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: --lock {photo}: holds" in proc.stderr and "hint: name a lock file" in proc.stderr
    assert _digest(photo) == before
