"""Issue 13, item 10: an -o that cannot be written is found before any model is resolved or
loaded (it used to fail image by image after the diffusion); with one input, an -o with an image
suffix is that output file, not a folder of that name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_model_args
from hardening import pasd_in_process
from PIL import Image

from pasd_cli.imageio.metadata import read_record

QUICK = ["--device", "cpu", "--dtype", "fp32", "--steps", "1", "--process-size", "16", "--scale", "2"]
NO_MODEL = ["--pasd", "/no/such/checkpoint", "--caption", "none"]  # resolving it would fail with exit 3


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    Image.new("RGB", (16, 12), "red").save(path)
    return path


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_an_output_under_proc_is_refused_before_the_models(capsys, photo):
    """As root every access check passes: only writing shows that /proc takes no files."""
    run = pasd_in_process(capsys, "upscale", photo, "-o", "/proc/pasd-out", *NO_MODEL, *QUICK)
    assert run.code == 2, run.stderr
    assert "-o /proc/pasd-out: cannot write there" in run.one_error()


def test_the_check_leaves_no_folder_behind(capsys, tmp_path, photo):
    out = tmp_path / "new" / "out"
    run = pasd_in_process(capsys, "upscale", photo, "-o", out, *NO_MODEL, *QUICK)
    assert run.code == 3, run.stderr  # the writable folder passed; the model is what is missing
    assert not (tmp_path / "new").exists()


def test_one_input_and_an_image_suffix_write_that_file(capsys, tmp_path, photo):
    target = tmp_path / "results" / "photo_big.jpg"
    run = pasd_in_process(
        capsys, "upscale", photo, "-o", target, *tiny_model_args(), *QUICK, "--caption", "none", "--json"
    )
    assert run.code == 0, run.stderr
    record = json.loads(run.stdout.splitlines()[0])
    assert record["status"] == "done" and record["output"] == str(target)
    assert target.is_file() and sorted(p.name for p in target.parent.iterdir()) == ["photo_big.jpg"]
    with Image.open(target) as image:
        assert image.format == "JPEG" and image.size == (32, 24)  # the suffix decides the format
        assert read_record(image)["command"] == "upscale"

    again = pasd_in_process(capsys, "upscale", photo, "-o", target, *NO_MODEL, *QUICK, "--json")
    assert again.code == 0 and json.loads(again.stdout.splitlines()[0])["status"] == "skipped"


def test_an_image_suffix_with_several_inputs_is_refused(capsys, tmp_path, photo):
    other = tmp_path / "other.png"
    Image.new("RGB", (16, 12)).save(other)
    run = pasd_in_process(capsys, "upscale", photo, other, "-o", tmp_path / "big.png", "--dry-run")
    assert run.code == 2
    assert "names one image file, but 2 inputs were given" in run.one_error()


def test_a_folder_with_an_image_suffix_stays_a_folder(capsys, tmp_path, photo):
    folder = tmp_path / "shots.png"
    folder.mkdir()
    run = pasd_in_process(capsys, "upscale", photo, "-o", folder, "--dry-run", "--json")
    assert run.code == 0, run.stderr
    assert json.loads(run.stdout.splitlines()[0])["output"] == str(folder / "photo.png")


def test_the_failure_log_of_a_file_output_goes_beside_it(capsys, tmp_path):
    shots = tmp_path / "shots"
    shots.mkdir()
    (shots / "broken.png").write_bytes(b"not an image")
    run = pasd_in_process(capsys, "upscale", shots, "-o", tmp_path / "big.png", "--caption", "none", *QUICK)
    assert run.code == 1, run.stderr
    assert (tmp_path / ".pasd-failures.json").is_file() and not (tmp_path / "big.png").exists()
