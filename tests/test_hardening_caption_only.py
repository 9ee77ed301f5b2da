"""Issue 13, item 13: `--dry-run --caption-only > prompts.csv` writes nothing to stdout unless
the pass can finish: a captioner found missing on a later image used to leave a header and the
rows before it, a CSV that looks like a result."""

from __future__ import annotations

import csv
import io

from hardening import pasd_in_process
from PIL import Image


def test_a_missing_captioner_leaves_stdout_empty(capsys, tmp_path):
    for name in ("a", "b"):
        Image.new("RGB", (16, 16), "red" if name == "a" else "blue").save(tmp_path / f"{name}.png")
    given = tmp_path / "given.csv"
    given.write_text("file,prompt\na.png,a red square\n")  # a is described; b needs the captioner
    args = ["upscale", tmp_path / "a.png", tmp_path / "b.png", "-o", tmp_path / "out", "--dry-run", "--caption-only"]
    common = [*args, "--caption", "blip", "--offline", "--device", "cpu", "--models-dir", tmp_path / "empty-store"]
    run = pasd_in_process(capsys, *common, "--prompt-file", given)
    assert run.code == 3, run.stderr
    assert "captioner for --caption blip (blip) is not available" in run.one_error()
    assert run.stdout == ""

    # The same pass that can finish still prints the whole CSV.
    (tmp_path / "b.txt").write_text("a blue square")  # a sidecar: described where it is, not in the CSV
    done = pasd_in_process(capsys, *common, "--prompt-file", given)
    assert done.code == 0, done.stderr
    assert list(csv.reader(io.StringIO(done.stdout))) == [["file", "prompt"], [str(tmp_path / "a.png"), "a red square"]]
