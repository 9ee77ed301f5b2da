"""Mistakes a user or a cron script makes on the command line: each is one `error:` line (and a
`hint:`), the README's exit code, and no model work. The real `pasd` command in a subprocess;
none of these load a model, so each run takes a fraction of a second."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import pasd_command, run_pasd, tiny_model_args
from PIL import Image

MODEL = [
    *tiny_model_args(),
    "--device",
    "cpu",
    "--dtype",
    "fp32",
    "--caption",
    "none",
    "--steps",
    "1",
    "--process-size",
    "16",
    "--scale",
    "2",
]


def one_error(stderr: str) -> str:
    """The `error:` line, after checking it is the only one and no traceback came with it."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def imported_modules(stderr: str) -> set[str]:
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "a.png"
    Image.new("RGB", (16, 16), "red").save(path)
    return path


@pytest.mark.parametrize(
    "template, message",
    [
        ("{foo}", "unknown field {foo}"),
        ("{stem}/{scale}", "not a file name"),
        ("{scale:d}", "Unknown format code 'd'"),  # every field is text
        ("{stem:=5}", "alignment not allowed"),
        ("{", "Single '{'"),
    ],
)
def test_name_templates_that_cannot_work_are_usage_errors(photo, tmp_path, template, message):
    proc = run_pasd("upscale", photo, "-o", tmp_path / "out", "--name", template, "--dry-run")
    assert proc.returncode == 2
    assert message in one_error(proc.stderr)


def test_an_empty_output_is_refused_not_taken_for_the_current_folder(photo, tmp_path):
    proc = run_pasd("upscale", photo, "-o", "", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2 and "-o is empty" in one_error(proc.stderr)


@pytest.mark.parametrize("option, value", [("--device", "gpu"), ("--dtype", "float16")])
def test_an_unknown_device_or_dtype_is_refused_by_a_dry_run_too(photo, tmp_path, option, value):
    proc = run_pasd("upscale", photo, "-o", tmp_path / "out", option, value, "--dry-run")
    assert proc.returncode == 2 and f"{option} {value}: choose from" in one_error(proc.stderr)
    upper = run_pasd("upscale", photo, "-o", tmp_path / "out", "--device", "CPU", "--dtype", "FP32", "--dry-run")
    assert upper.returncode == 0, upper.stderr


def test_an_output_folder_that_cannot_be_made_fails_before_the_model_loads(photo, tmp_path):
    blocked = photo / "out"  # a file where a folder would have to be
    proc = run_pasd("upscale", photo, "-o", blocked, *MODEL, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert proc.returncode == 2
    assert f"-o {blocked}: not a folder ({photo} is in its path)" in one_error(proc.stderr)
    assert "loading PASD" not in proc.stderr and "torch" not in imported_modules(proc.stderr)
    dry = run_pasd("upscale", photo, "-o", blocked, "--dry-run")  # exits as the run would
    assert dry.returncode == 2 and "not a folder" in one_error(dry.stderr)


def test_a_failure_log_that_cannot_be_written_still_ends_with_the_summary(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "notes.png").write_text("not a picture")  # fails from its header: no model needed
    (tmp_path / "out" / ".pasd-failures.json").mkdir(parents=True)  # a folder where the log goes
    proc = run_pasd("upscale", folder, "-o", tmp_path / "out", "--json")
    assert proc.returncode == 1  # the input failed; the log is only a re-run's memory
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary["type"] == "summary" and summary["failed"] == 1
    assert "warning: cannot write" in proc.stderr and "Traceback" not in proc.stderr


def test_help_shows_the_quality_default():
    proc = run_pasd("upscale", "--help", env={"COLUMNS": "200"})
    line = next(line for line in proc.stdout.splitlines() if "--quality" in line)
    assert "JPEG and WebP quality (default: 95 for jpg" in line, line


# ---- the model store's commands ------------------------------------------------------------------


def test_importing_a_file_that_is_not_a_bundle_is_one_error_line(photo, tmp_path):
    proc = run_pasd("models", "import", photo, "--models-dir", tmp_path / "store")
    assert proc.returncode == 3
    assert "not a bundle" in one_error(proc.stderr)
    assert len(proc.stderr.splitlines()) == 2  # the error and its hint; tarfile's message had five lines


def test_an_unknown_model_name_lists_the_known_ones(tmp_path):
    proc = run_pasd("download", "nosuch", "--models-dir", tmp_path / "store")
    assert proc.returncode == 3 and "unknown model 'nosuch'" in one_error(proc.stderr)
    hint = proc.stderr.splitlines()[-1]
    assert hint.startswith("hint: known models:") and "pasd-light" in hint
    assert "folder" not in hint  # `pasd download` takes no folder


def test_hints_name_the_store_that_was_given(tmp_path):
    store = tmp_path / "my store"
    proc = run_pasd("models", "export", "pasd", tmp_path / "pasd.tar", "--models-dir", store)
    assert proc.returncode == 3 and "cannot export pasd" in one_error(proc.stderr)
    assert proc.stderr.splitlines()[-1] == f"hint: fetch or repair it with: pasd download pasd --models-dir '{store}'"


def test_an_image_is_not_written_to_a_terminal(photo):
    leader, terminal = os.openpty()
    try:
        proc = subprocess.run(
            [*pasd_command(), "upscale", str(photo), "-o", "-", *MODEL],
            stdout=terminal,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            timeout=60,
        )
    finally:
        os.close(terminal)
        os.close(leader)
    assert proc.returncode == 2 and "which is the terminal" in one_error(proc.stderr)
    assert "loading PASD" not in proc.stderr


def test_an_empty_list_on_stdin_is_reported(tmp_path):
    proc = subprocess.run(
        [*pasd_command(), "upscale", "-", "-o", str(tmp_path / "out"), "--dry-run"],
        input="\n\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0  # nothing to do is not a failure
    assert "warning: - (the list on stdin): no images found" in proc.stderr


def test_skips_are_listed_only_with_v(photo, tmp_path):
    """README: -v shows 'every step, skip and timing'; a cron re-run stays quiet but for the summary."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(photo.read_bytes())
    quiet = run_pasd("upscale", photo, "-o", out, "--dry-run")
    assert quiet.returncode == 0 and quiet.stderr.splitlines() == ["1 skipped in 0s"]
    verbose = run_pasd("upscale", photo, "-o", out, "--dry-run", "-v")
    assert f"skip {photo}: output exists" in verbose.stderr
