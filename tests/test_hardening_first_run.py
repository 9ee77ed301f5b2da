"""Issue 13, item 14: the first-run path. The README's local-folder line (`--pasd DIR --base DIR`)
works as written on a machine whose store is empty: the default captioner is not installed, so
images go undescribed, with a warning (an explicit --caption blip still refuses). The hint for
missing models names every one of them (the captioner too) in one command, and comes before the
summary line. `--lora FILE:abc` names the weight, not a missing file."""

from __future__ import annotations

import json
import re

import pytest
from conftest import tiny_model_args
from hardening import pasd_in_process
from PIL import Image

QUICK = ["--device", "cpu", "--dtype", "fp32", "--steps", "1", "--process-size", "16", "--scale", "2"]


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    Image.new("RGB", (16, 16), "red").save(path)
    return path


def test_the_readme_local_folder_line_runs_with_an_empty_store(capsys, tmp_path, photo):
    store = ["--models-dir", tmp_path / "empty-store"]
    run = pasd_in_process(
        capsys, "upscale", photo, "-o", tmp_path / "out", *tiny_model_args(), *store, *QUICK, "--json"
    )
    assert run.code == 0, run.stderr
    record = json.loads(run.stdout.splitlines()[0])
    assert record["status"] == "done" and record["prompt_source"] == "none"
    warnings = [line for line in run.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "the default captioner (blip) is not installed" in warnings[0]
    assert "pasd download blip" in warnings[0] and "--caption none" in warnings[0]

    asked = pasd_in_process(
        capsys, "upscale", photo, "-o", tmp_path / "out2", *tiny_model_args(), *store, *QUICK, "--caption", "blip"
    )
    assert asked.code == 3 and "captioner for --caption blip (blip) is not available" in asked.one_error()


def test_the_missing_models_hint_names_them_all_before_the_summary(capsys, tmp_path, photo):
    root = tmp_path / "empty-store"
    run = pasd_in_process(capsys, "upscale", photo, "-o", tmp_path / "out", "--models-dir", root, *QUICK)
    assert run.code == 3, run.stderr
    error = run.one_error()
    assert all(f"'{name}' (not installed)" in error for name in ("pasd", "sd15", "blip")), error
    lines = run.stderr.splitlines()
    assert lines[-3:] == [error, f"hint: fetch with: pasd download pasd sd15 blip --models-dir {root}", lines[-1]]
    assert re.fullmatch(r"1 cancelled in \d+s", lines[-1])  # the summary comes last, after the reason for it


def test_a_dry_run_with_collisions_says_the_error_before_the_summary(capsys, tmp_path):
    for suffix in (".png", ".jpg"):
        Image.new("RGB", (16, 16)).save(tmp_path / f"a{suffix}")
    run = pasd_in_process(
        capsys, "upscale", tmp_path / "a.png", tmp_path / "a.jpg", "-o", tmp_path / "out", "--dry-run"
    )
    assert run.code == 2
    lines = run.stderr.splitlines()
    assert lines[-3].startswith("error: 1 output name collision(s)") and lines[-2].startswith("hint:")
    assert re.fullmatch(r"2 collision in \d+s", lines[-1])


@pytest.mark.parametrize("weight", ["abc", ""])
def test_a_lora_weight_that_is_not_a_number_is_named(capsys, tmp_path, photo, weight):
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"")
    run = pasd_in_process(
        capsys, "stylize", photo, "-o", tmp_path / "out", "--style", tmp_path, "--lora", f"{lora}:{weight}", "--dry-run"
    )
    assert run.code == 2, run.stderr
    error = run.one_error()
    assert f"the weight '{weight}' is not a number" in error and "not found" not in error


def test_the_readme_command_for_the_slow_tests_adds_them_to_the_default_ones():
    """`-m slow` would replace the default selection; the README's command must keep it."""
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    marker = re.search(r'`python -m pytest -m "([^"]+)"` adds the long runs', readme)
    assert marker, "the README names the command that adds the slow tests"
    chosen = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", marker.group(1), "tests/test_batch_cli.py"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
    ).stdout
    default = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/test_batch_cli.py"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
    ).stdout
    tests = {line for line in chosen.splitlines() if "::" in line}
    defaults = {line for line in default.splitlines() if "::" in line}
    assert defaults and defaults < tests  # every default test, and more: the slow ones
