"""A run removes the temporary files that a killed run (kill -9, a power loss) left in its output
folders: only ours, by their name, and never one that another run is writing at that moment."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from model_free import run_enlarge
from PIL import Image

from pasd_cli.atomic import is_temporary, remove_stale, write_atomic


def _photo(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
    return path


def _killed_writer(folder: Path, name: str) -> Path:
    """A real writer, killed with SIGKILL in the middle of writing `folder/name`: its temporary
    file is left behind."""
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from pasd_cli.atomic import write_atomic

        def write(handle):
            handle.write(b"half an image")
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        write_atomic(Path({str(folder / name)!r}), write)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    (left,) = [p for p in folder.iterdir() if p.name.startswith(f".{name}.")]
    assert is_temporary(left.name)
    return left


def test_a_run_removes_what_killed_writers_left_in_its_output_folders(capsys, tmp_path):
    photos = tmp_path / "in"
    _photo(photos / "a.png")
    _photo(photos / "sub" / "b.png", 1)
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    stale = [_killed_writer(out, "a.png"), _killed_writer(out / "sub", "b.png"), _killed_writer(out, "x.jpg")]
    # Files of the user's that look alike are left alone, and so is a link named like ours.
    mine = [out / ".a.png.part", out / "notes.part", out / "a.png.abcd1234.part", out / ".a.png.ABCD1234.part"]
    for path in mine:
        path.write_bytes(b"mine")
    link = out / ".c.png.abcd1234.part"
    link.symlink_to(photos / "a.png")

    # A dry run changes nothing.
    assert run_enlarge(capsys, [photos], out, recursive=True, dry_run=True)[2] == 0
    assert all(p.exists() for p in stale)

    records, _, code = run_enlarge(capsys, [photos], out, recursive=True)
    assert code == 0 and {r["status"] for r in records.values()} == {"done"}
    assert not any(p.exists() for p in stale)
    assert all(p.read_bytes() == b"mine" for p in mine) and link.is_symlink()
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png") if not p.name.startswith(".")) == [
        "a.png",
        "sub/b.png",
    ]


def test_a_temporary_file_being_written_is_never_taken_for_a_stale_one(tmp_path):
    """Another run starts while this one writes: it sees the temporary file, locked, and leaves it."""
    target = tmp_path / "a.png"
    seen = []

    def write(handle):
        handle.write(b"first half ")
        (temporary,) = [p for p in tmp_path.iterdir() if is_temporary(p.name)]
        seen.append(temporary)
        assert remove_stale(tmp_path) == []  # what a run starting now does
        assert temporary.exists()
        handle.write(b"second half")

    write_atomic(target, write)
    assert target.read_bytes() == b"first half second half"
    assert not seen[0].exists() and os.listdir(tmp_path) == ["a.png"]
