"""Issue 13, item 8: each output records a fingerprint of what decides its pixels; a re-run with
other settings no longer skips silently. `--on-exists skip` still skips, names the settings that
differ and counts them in the summary (JSON and text); `--on-exists if-stale` makes those outputs
again. A file not made by pasd is never replaced."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_model_args
from hardening import pasd_in_process
from PIL import Image

from pasd_cli.imageio.metadata import read_record

QUICK = ["--device", "cpu", "--dtype", "fp32", "--process-size", "16", "--scale", "2", "--caption", "none"]


def records(stdout: str) -> tuple[dict, dict]:
    lines = [json.loads(line) for line in stdout.splitlines()]
    return lines[0], lines[-1]


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "in" / "photo.png"
    path.parent.mkdir()
    Image.new("RGB", (16, 12), "red").save(path)
    return path


def test_settings_changed_since_an_output_was_made_are_told_and_if_stale_redoes_it(capsys, tmp_path, photo):
    out = tmp_path / "out"

    def pasd(*extra):
        return pasd_in_process(capsys, "upscale", photo, "-o", out, *tiny_model_args(), *QUICK, "--json", *extra)

    first = pasd("--steps", "1")
    assert first.code == 0, first.stderr
    made = out / "photo.png"
    with Image.open(made) as image:
        fingerprint = read_record(image)["fingerprint"]
    assert fingerprint["settings"]["steps"] == 1 and fingerprint["prompt"] == {"caption": "none"}

    same = pasd("--steps", "1", "--on-exists", "if-stale")
    record, summary = records(same.stdout)
    assert record["status"] == "skipped" and record["reason"] == "output exists"
    assert summary["skipped_other_settings"] == 0

    changed = pasd("--steps", "2", "--seed", "7", "-v")
    record, summary = records(changed.stdout)
    assert changed.code == 0 and record["status"] == "skipped"
    assert record["reason"] == "output exists, made with other settings (seed, steps)"
    assert record["other_settings"] == ["seed", "steps"] and summary["skipped_other_settings"] == 1
    assert "1 skipped (1 made with other settings: --on-exists if-stale makes them again)" in changed.stderr

    (photo.parent / "photo.txt").write_text("a red square")  # a new description is another setting too
    planned = pasd("--steps", "1", "--on-exists", "if-stale", "--dry-run")
    record, _ = records(planned.stdout)
    assert record["status"] == "planned" and record["other_settings"] == ["prompt"]
    (photo.parent / "photo.txt").unlink()

    redone = pasd("--steps", "2", "--seed", "7", "--on-exists", "if-stale")
    record, summary = records(redone.stdout)
    assert redone.code == 0 and record["status"] == "done" and summary["skipped_other_settings"] == 0
    with Image.open(made) as image:
        assert read_record(image)["settings"]["steps"] == 2
    again = pasd("--steps", "2", "--seed", "7", "--on-exists", "if-stale")
    assert records(again.stdout)[0]["status"] == "skipped"


def test_if_stale_never_replaces_a_file_pasd_did_not_make(capsys, tmp_path, photo):
    out = tmp_path / "out"
    out.mkdir()
    theirs = out / "photo.png"
    Image.new("RGB", (4, 4), "blue").save(theirs)
    before = theirs.read_bytes()
    run = pasd_in_process(
        capsys, "upscale", photo, "-o", out, *tiny_model_args(), *QUICK, "--json", "--on-exists", "if-stale"
    )
    record, summary = records(run.stdout)
    assert run.code == 0 and record["status"] == "skipped" and record["reason"] == "output exists (not made by pasd)"
    assert theirs.read_bytes() == before and summary["skipped_other_settings"] == 0
