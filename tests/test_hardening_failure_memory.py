"""The failure memory keeps only failures caused by what a file contains: an input that could not
be read (permission denied, an I/O error) is tried again by the next run, once it can be read.

The tests run as root here, where chmod cannot deny a read, so the operating system's refusal is
injected where Pillow opens the file."""

from __future__ import annotations

import builtins
import errno
from pathlib import Path

import numpy as np
import pytest
from model_free import run_enlarge
from PIL import Image, ImageFile

from pasd_cli.batch.failures import FailureLog


def _photo(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    photos = tmp_path / "in"
    photos.mkdir()
    _photo(photos / "a.png", 1)
    _photo(photos / "b.png", 2)
    (photos / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # broken: its content fails
    return photos


def _refuse(monkeypatch, target: Path, error: OSError) -> None:
    """Opening `target` fails as the system would fail it."""
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if isinstance(file, (str, Path)) and Path(file) == target:
            raise error
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)


@pytest.mark.parametrize(
    "error, reason",
    [
        (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
        (OSError(errno.EIO, "Input/output error"), "Input/output error"),
    ],
)
def test_an_unreadable_input_is_not_remembered_and_a_rerun_processes_it(capsys, monkeypatch, folder, error, reason):
    out = folder.parent / "out"
    with monkeypatch.context() as patch:
        _refuse(patch, folder / "b.png", error)
        records, summary, code = run_enlarge(capsys, [folder], out)
    assert code == 1
    assert records[str(folder / "b.png")]["status"] == "failed" and reason in records[str(folder / "b.png")]["reason"]
    assert records[str(folder / "c.png")]["status"] == "failed"
    log = FailureLog(out)
    assert log.known(folder / "b.png") is None  # the read failed, not the file
    assert log.known(folder / "c.png") is not None  # its content failed: remembered
    # After the fix (chmod, a remount), the next run does it; the broken file stays skipped.
    records, summary, code = run_enlarge(capsys, [folder], out)
    assert code == 0
    assert records[str(folder / "b.png")]["status"] == "done"
    assert records[str(folder / "c.png")]["status"] == "skipped"
    with Image.open(out / "b.png") as image:
        assert image.size == (32, 24)


def test_a_read_error_while_decoding_is_not_remembered_either(capsys, monkeypatch, folder):
    """The header reads, then the disk fails under the decoder."""
    out = folder.parent / "out"
    real_load = ImageFile.ImageFile.load

    def failing_load(self):
        if getattr(self, "filename", None) == str(folder / "a.png"):
            raise OSError(errno.EIO, "Input/output error")
        return real_load(self)

    with monkeypatch.context() as patch:
        patch.setattr(ImageFile.ImageFile, "load", failing_load)
        records, _, code = run_enlarge(capsys, [folder], out)
    assert code == 1 and "Input/output error" in records[str(folder / "a.png")]["reason"]
    assert FailureLog(out).known(folder / "a.png") is None
    records, _, _ = run_enlarge(capsys, [folder], out)
    assert records[str(folder / "a.png")]["status"] == "done"
