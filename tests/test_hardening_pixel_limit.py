"""The working size (after the process-size enlargement) and the output size are planned from the
header, shown by the dry run, and refused over the pixel limit with a reason, remembered; a
higher --max-pixels tries again. --scale has an upper bound."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_pasd, tiny_model_args
from model_free import Enlarge, run_enlarge
from PIL import Image

from pasd_cli.batch.failures import FailureLog
from pasd_cli.batch.sizes import DEFAULT_MAX_PIXELS
from pasd_cli.engine.resize import colorize_working_size, make_hint, working_size
from pasd_cli.engine.settings import UpscaleSettings

MODEL = [*tiny_model_args(), "--device", "cpu", "--caption", "none"]


def _image(path: Path, size: tuple[int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize(
    "size, scale, process",
    [((16, 12), 2, 16), ((5000, 3), 4, 768), ((33, 17), 2.5, 64), ((512, 384), 4, 768), ((7, 1000), 1, 112)],
)
def test_the_planned_working_size_is_the_size_the_engine_makes(size, scale, process):
    if size == (5000, 3):  # too big to make: the gigapixel the issue met
        assert working_size(size, scale, process) == (1280000, 768)
        return
    hint = make_hint(Image.new("RGB", size), scale, process)
    assert working_size(size, scale, process) == hint.size


def test_colorize_working_size_is_its_hint_size():
    from pasd_cli.engine.colorize import colorize_hint

    for size in [(100, 60), (60, 500), (31, 31), (1000, 700)]:
        assert colorize_working_size(size, 64) == colorize_hint(Image.new("RGB", size), 64).size


class _Diffusion(Enlarge):
    """Plans like upscale: scale 4 and a process size of 768."""

    scale = 4

    def planned_working_size(self, size):
        return working_size(size, self.scale, 768)


def _run(capsys, inputs, out, **options):
    from io import StringIO

    from pasd_cli.batch.runner import run_batch
    from pasd_cli.batch.settings import BatchSettings
    from pasd_cli.errors import PasdError

    batch = BatchSettings(inputs=tuple(map(str, inputs)), output=str(out), json=True, **options)
    command = _Diffusion(batch)
    capsys.readouterr()
    try:
        code = run_batch(command, batch, stdin=StringIO()).exit_code
    except PasdError as exc:
        code = exc.exit_code
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    return {Path(r["input"]).name: r for r in lines if r["type"] == "image"}, code, command


def test_a_strip_that_would_be_a_gigapixel_is_refused_remembered_and_tried_again_with_a_higher_limit(capsys, tmp_path):
    photos = tmp_path / "in"
    _image(photos / "strip.png", (5000, 3))
    _image(photos / "photo.png", (40, 30))
    out = tmp_path / "out"
    records, code, command = _run(capsys, [photos], out, dry_run=True)
    assert code == 1
    assert records["photo.png"]["status"] == "planned"
    assert records["photo.png"]["output_size"] == [160, 120] and records["photo.png"]["working_size"] == [1024, 768]
    strip = records["strip.png"]
    assert strip["status"] == "failed" and strip["working_size"] == [1280000, 768]
    assert "working size 1280000x768 (983 MP) is above the pixel limit of 64 MP" in strip["reason"]
    assert "--max-pixels" in strip["reason"]

    records, code, command = _run(capsys, [photos], out)
    assert code == 1 and records["strip.png"]["status"] == "failed" and records["photo.png"]["status"] == "done"
    assert "pixel limit" in FailureLog(out).known(photos / "strip.png")
    # Reported once: the next run skips it and exits 0, without loading anything.
    records, code, command = _run(capsys, [photos], out)
    assert code == 0 and records["strip.png"]["status"] == "skipped" and command.loads == 0
    assert "pixel limit" in records["strip.png"]["reason"]
    # A higher limit plans it again: the remembered refusal was about the limit.
    records, code, _ = _run(capsys, [photos], out, dry_run=True, max_pixels=1_000_000_000)
    assert records["strip.png"]["status"] == "planned" and code == 0


def test_the_output_size_counts_too(capsys, tmp_path):
    """A command without a model has no working image: its output alone is checked."""
    photo = _image(tmp_path / "a.png", (100, 100))
    records, _, code = run_enlarge(capsys, [photo], tmp_path / "out", dry_run=True, max_pixels=30_000)
    (record,) = records.values()
    assert code == 1 and record["reason"].startswith("output size 200x200 (40000 pixels) is above the pixel limit")
    assert "working_size" not in record
    assert DEFAULT_MAX_PIXELS == 64_000_000  # as the README says


def test_the_command_line_shows_both_sizes_and_bounds_scale(tmp_path):
    photo = _image(tmp_path / "a.png", (40, 30))
    strip = _image(tmp_path / "strip.png", (5000, 3))
    plan = run_pasd("upscale", photo, strip, "-o", tmp_path / "out", *MODEL, "--dry-run")
    assert plan.returncode == 1, plan.stderr
    assert f"plan {photo} -> {tmp_path / 'out' / 'a.png'} (160x120, working 1024x768)" in plan.stderr
    assert f"error: {strip}: working size 1280000x768 (983 MP) is above the pixel limit" in plan.stderr
    raised = run_pasd("upscale", strip, "-o", tmp_path / "out", *MODEL, "--dry-run", "--max-pixels", "2000000000")
    assert raised.returncode == 0, raised.stderr
    for bad in ("17", "1e9"):
        proc = run_pasd("upscale", photo, "-o", tmp_path / "out", "--scale", bad, "--dry-run")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert f"error: --scale {float(bad)}: scale must be at most 16" in proc.stderr
    zero = run_pasd("upscale", photo, "-o", tmp_path / "out", "--max-pixels", "0", "--dry-run")
    assert zero.returncode == 2 and "--max-pixels" in zero.stderr


def test_scale_bound_in_the_settings():
    with pytest.raises(ValueError, match="scale must be at most 16"):
        UpscaleSettings(scale=16.5)
    assert UpscaleSettings(scale=16).scale == 16
