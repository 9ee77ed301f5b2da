"""Fault injection: SIGINT, SIGTERM and SIGKILL delivered at many points of a batch of 10 images
(the tiny model), each run re-run until the batch is done. Every output then decodes and is
identical to an uninterrupted run's, no temporary file remains, and each interrupted run exits
130 (or is killed: -9) with no traceback and every input accounted for.

The signals are real: the command line sends them to itself at named points (`PASD_FAULT`, see
pasd_cli/cli/faults.py), at once or from a timer so that they land inside what follows (the
imports of torch and diffusers, the weights read); the slow variant also sends them from outside
at random moments. The default variant covers each kind of point once (three runs load the model); `-m slow`
runs every signal at every point."""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import pasd_command, pasd_here, run_pasd, tiny_model_args
from hardening import pasd_in_process
from PIL import Image

from pasd_cli.atomic import is_temporary

IMAGES = 10
# Two steps per image, so a step point lands inside an image's diffusion.
ARGS = [*tiny_model_args(), "--device", "cpu", "--dtype", "fp32", "--caption", "none"]
ARGS += ["--scale", "2", "--steps", "2", "--guidance", "1", "--process-size", "16"]
KILLED = -9

# (PASD_FAULT, what the run was doing). Counts are within one run: a re-run skips what is done.
SHORT = [
    ("start:1:INT", "starting, before the command line is imported"),
    ("load:1:TERM:0.3", "importing torch"),
    ("load:1:KILL:1", "importing the libraries or reading the weights"),
    ("step:3:INT", "denoising the second image"),
    ("write:2:KILL", "writing the first image: its bytes in the temporary file"),
]
LONG = [
    f"{point}:{sig}{delay}"
    for sig in ("INT", "TERM", "KILL")
    for point, delay in [
        ("start:1", ""),
        ("start:1", ":0.2"),
        ("load:1", ""),
        ("load:1", ":0.1"),
        ("load:1", ":1"),
        ("load:1", ":2.5"),
        ("step:1", ""),
        ("step:4", ""),
        ("write:1", ""),
        ("write:2", ""),
        ("write:6", ""),
    ]
]


def _photos(folder: Path) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(7)
    for i in range(IMAGES):
        size = (12 + 2 * (i % 3), 10 + 2 * (i % 2))
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def _pixels(folder: Path) -> dict[str, np.ndarray]:
    """Every visible output, decoded (which fails on a partial file)."""
    decoded = {}
    for path in sorted(folder.glob("*.png")):
        with Image.open(path) as image:
            image.load()
            decoded[path.name] = np.asarray(image)
    return decoded


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if is_temporary(p.name)) if folder.exists() else []


@pytest.fixture
def batch(tmp_path, capsys):
    """The photos and the outputs of an uninterrupted run (in this process: no start-up cost)."""
    photos = _photos(tmp_path / "in")
    done = pasd_in_process(capsys, "upscale", photos, "-o", tmp_path / "reference", *ARGS)
    assert done.code == 0, done.stderr
    reference = _pixels(tmp_path / "reference")
    assert len(reference) == IMAGES
    return photos, reference


def _check_interrupted(proc: subprocess.CompletedProcess, expected: int, out: Path, reference: dict) -> None:
    note = f"{proc.args}\n{proc.stderr}"
    assert proc.returncode == expected, note
    assert "Traceback" not in proc.stderr, note
    for name, pixels in _pixels(out).items() if out.exists() else []:  # what is visible is whole
        assert np.array_equal(pixels, reference[name]), name
    if expected == KILLED:
        return
    assert proc.stderr.strip().splitlines()[-1].startswith("error: interrupted by SIG"), note
    assert not _temporaries(out), note  # an interrupt cleans up after itself
    if proc.stdout:  # planned by then: every input is accounted for
        lines = [json.loads(line) for line in proc.stdout.splitlines()]
        records, summary = lines[:-1], lines[-1]
        assert len(records) == IMAGES and summary["total"] == IMAGES, note
        assert {r["status"] for r in records} <= {"done", "skipped", "interrupted", "cancelled"}, note
        assert summary["error"].startswith("interrupted by SIG"), note
        assert summary["done"] + summary["skipped"] + summary["interrupted"] + summary["cancelled"] == IMAGES


def _finish(photos: Path, out: Path, reference: dict) -> None:
    """Run until done: once, for the signals have all been sent."""
    proc = pasd_here("upscale", photos, "-o", out, *ARGS, "--json")
    assert proc.returncode == 0, proc.stderr
    assert not _temporaries(out)  # what a killed run left is gone
    outputs = _pixels(out)
    assert sorted(outputs) == sorted(reference)
    for name, pixels in outputs.items():
        assert np.array_equal(pixels, reference[name]), name


def _faulted_runs(photos: Path, out: Path, reference: dict, faults: list[str]) -> None:
    for fault in faults:
        expected = KILLED if ":KILL" in fault else 130
        proc = run_pasd("upscale", photos, "-o", out, *ARGS, "--json", env={"PASD_FAULT": fault})
        _check_interrupted(proc, expected, out, reference)


def test_signals_at_every_kind_of_point_then_a_rerun_completes_the_batch(batch, tmp_path):
    photos, reference = batch
    out = tmp_path / "out"
    _faulted_runs(photos, out, reference, [fault for fault, _ in SHORT])
    assert 0 < len(_pixels(out)) < IMAGES  # some images were done before the end
    _finish(photos, out, reference)


@pytest.mark.slow
def test_every_signal_at_every_point(batch, tmp_path):
    photos, reference = batch
    out = tmp_path / "out"
    _faulted_runs(photos, out, reference, LONG)
    _finish(photos, out, reference)


@pytest.mark.slow
def test_signals_from_outside_at_random_moments(batch, tmp_path):
    """As a user's Ctrl-C, a service manager's SIGTERM or the OOM killer's SIGKILL come: at any
    moment, from another process; twelve of them, then a run to the end."""
    import signal

    photos, reference = batch
    out = tmp_path / "out"
    rng = random.Random(13)
    for _ in range(12):
        sig = rng.choice([signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
        command = [*pasd_command(), "upscale", str(photos), "-o", str(out), *map(str, ARGS), "--json"]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(0.3, 20.0))  # start-up, imports, weights, images: whatever is under way
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=300)
        finished = subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
        if proc.returncode != 0:  # not done before the signal came
            _check_interrupted(finished, KILLED if sig == signal.SIGKILL else 130, out, reference)
    _finish(photos, out, reference)
