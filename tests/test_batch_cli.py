"""`pasd upscale` as scripts and cron jobs use it: the real command in a subprocess, the tiny
reference model, and a folder of real, awkward files made at test time (tests/batch_images.py)."""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import resource
import signal
import subprocess
from pathlib import Path

import numpy as np
import png
import pytest
from batch_images import BAD, GOOD, HIDDEN, make_photo_folder
from conftest import TINY_PASD, pasd_command, pasd_here, run_pasd, tiny_model_args
from PIL import Image

from pasd_cli.imageio.metadata import read_record

MODEL = [*tiny_model_args(), "--device", "cpu", "--dtype", "fp32", "--caption", "none"]
# Small and quick; the wavelet colour fix still carries the input's colours into the output.
FAST = ["--scale", "2", "--steps", "1", "--guidance", "1", "--process-size", "16"]
NAMING = ["--format", "same", "--name", "{stem}_x{scale}", "--recursive"]


def tree_state(root: Path, skip: Path | None = None) -> dict[str, str]:
    """Every file below root (hidden ones too) with the sha256 of its bytes."""
    state = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not (skip and path.is_relative_to(skip)):
            state[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def json_lines(stdout: str) -> tuple[list[dict], dict]:
    objects = [json.loads(line) for line in stdout.splitlines()]
    assert objects[-1]["type"] == "summary" and all(o["type"] == "image" for o in objects[:-1])
    return objects[:-1], objects[-1]


def imported_modules(stderr: str) -> set[str]:
    """Module names from PYTHONPROFILEIMPORTTIME's report."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def expected_output(name: str) -> str:
    stem, ext = os.path.splitext(name)
    ext = {".JPG": ".jpg"}.get(ext, ext)
    return f"{stem}_x2{ext}"


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """The first run over the whole folder, with the state of everything before it."""
    root = tmp_path_factory.mktemp("batch")
    photos = make_photo_folder(root / "in")
    work = root / "work"
    work.mkdir()
    before = tree_state(root)
    out = root / "out"
    command = ["upscale", photos, "-o", out, *NAMING, *FAST, *MODEL, "--json"]
    proc = pasd_here(*command, cwd=work)
    return {
        "root": root,
        "photos": photos,
        "out": out,
        "work": work,
        "before": before,
        "command": command,
        "proc": proc,
    }


def test_every_good_file_gets_a_faithful_output(folder_run):
    proc, photos, out = folder_run["proc"], folder_run["photos"], folder_run["out"]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("loading PASD") == 1  # the model is loaded once for the whole batch
    assert "on cpu (float32)" in proc.stderr  # the dtype chosen, not the option's spelling
    for name, (size, mode) in GOOD.items():
        written = out / expected_output(name)
        assert written.is_file(), f"{name}: no output\n{proc.stderr}"
        with Image.open(written) as image:
            assert (image.size, image.mode) == (size, mode), name
            assert image.format == Image.open(photos / name).format, name  # --format same
            record = read_record(image)
            assert record["command"] == "upscale", name
            assert record["settings"]["steps"] == 1 and record["settings"]["scale"] == 2.0, name
            assert record["model"]["pasd"] == str(TINY_PASD) and record["model"]["variant"] == "full", name
            assert record["model"]["rrdb_blocks"] == 0, name
            assert record["model"]["half_weights"] is False, name  # fp32 files: nothing to keep
            assert image.getexif().get(0x0112, 1) == 1, name
    # Recursion mirrors the tree; the same pixels give the same result wherever they sit in the order.
    upper = np.asarray(Image.open(out / "UPPER_x2.jpg"))
    assert np.array_equal(upper, np.asarray(Image.open(out / "sub" / "same_as_upper_x2.jpg")))


def test_rotated_jpeg_keeps_exif_icc_and_xmp_with_sizes_and_orientation_fixed(folder_run):
    with Image.open(folder_run["out"] / "rotated_x2.jpg") as image:
        exif = image.getexif()
        assert 0x0112 not in exif  # orientation applied to the pixels, so no longer in the metadata
        assert exif[0x010F] == "TestCam"
        assert dict(exif.get_ifd(0x8769)) == {0xA002: 32, 0xA003: 48}
        assert image.info["icc_profile"] == Image.open(folder_run["photos"] / "rotated.jpg").info["icc_profile"]
        xmp = image.info["xmp"].decode()
        assert "A. Photographer" in xmp and 'exif:PixelXDimension="32"' in xmp and "tiff:Orientation" not in xmp
        pixels = np.asarray(image).astype(int)
    # Stored left red / right blue, orientation 6: shown top red, bottom blue.
    top, bottom = pixels[:24].mean((0, 1)), pixels[24:].mean((0, 1))
    assert top[0] > top[2] + 80 and bottom[2] > bottom[0] + 80


def test_alpha_gray_and_16_bit_come_back(folder_run):
    photos, out = folder_run["photos"], folder_run["out"]
    rgba_in, rgba_out = Image.open(photos / "rgba.png"), Image.open(out / "rgba_x2.png")
    expected_alpha = rgba_in.getchannel("A").resize(rgba_out.size, Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(rgba_out.getchannel("A")), np.asarray(expected_alpha))
    gray16 = np.asarray(Image.open(out / "gray16_x2.png"))
    assert gray16.dtype == np.uint16
    assert len(np.unique(gray16 % 257)) > 8  # real 16-bit values, not 8-bit ones times 257
    # The gradient (1000 -> 64000, left to right) survives.
    assert gray16[:, :8].mean() < 20000 < 45000 < gray16[:, -8:].mean()
    assert Image.open(out / "gray_x2.png").mode == "L"
    # 16-bit RGB, which Pillow reads at 8 bits, comes back 16-bit with its gradient.
    width, height, flat, info = png.Reader(filename=str(out / "rgb16_x2.png")).read_flat()
    assert (width, height, info["bitdepth"], info["planes"]) == (32, 24, 16, 3)
    rgb16 = np.asarray(flat, dtype=np.uint16).reshape(height, width, 3)
    assert np.any(rgb16 % 256 != rgb16 // 256) and len(np.unique(rgb16[..., 0] % 257)) > 8
    left, right = rgb16[:, :8].mean((0, 1)), rgb16[:, -8:].mean((0, 1))
    assert right[0] - left[0] > 15000 and left[1] - right[1] > 15000  # red rises, green falls


def test_bad_files_are_reported_with_reasons_and_exit_1(folder_run):
    proc, photos = folder_run["proc"], folder_run["photos"]
    assert proc.returncode == 1, proc.stderr
    records, summary = json_lines(proc.stdout)
    by_input = {Path(r["input"]).relative_to(photos).as_posix(): r for r in records}
    # Every file with an image name is accounted for, once; README.txt is not an input.
    assert sorted(by_input) == sorted([*GOOD, *BAD, *HIDDEN]) and len(records) == len(by_input)
    for name in GOOD:
        record = by_input[name]
        assert record["status"] == "done" and record["reason"] is None, record
        assert record["output"] == str(folder_run["out"] / expected_output(name))
        assert record["output_size"] == list(GOOD[name][0]) and record["seed"] == 0
        assert record["seconds"] > 0
    for name, reason in {**BAD, **HIDDEN}.items():
        record = by_input[name]
        assert record["status"] == ("skipped" if name in HIDDEN else "failed"), record
        assert reason in record["reason"], record
        assert (f"error: {photos / name}: " in proc.stderr) == (name in BAD)
    assert by_input["gray16.png"]["bits"] == 16 and by_input["rgba.png"]["mode"] == "RGBA"
    assert (by_input["rgb16.png"]["bits"], by_input["rgb16.png"]["mode"]) == (16, "RGB")
    assert (summary["done"], summary["failed"], summary["skipped"]) == (len(GOOD), len(BAD), len(HIDDEN))
    assert summary["total"] == len(records)


def test_records_give_their_peak_memory_and_the_summary_the_throughput(folder_run):
    records, summary = json_lines(folder_run["proc"].stdout)
    done = [r for r in records if r["status"] == "done"]
    for record in done:
        # On the CPU: the process's peak RSS during that image; at least the torch it imported.
        assert record["peak_memory_kind"] == "rss" and 100 < record["peak_memory_mb"] < 64 * 1024, record
    seconds = sum(r["seconds"] for r in done)
    megapixels = sum(r["output_size"][0] * r["output_size"][1] for r in done) / 1e6
    assert summary["megapixels_per_second"] == pytest.approx(megapixels / seconds, rel=1e-2)
    assert summary["images_per_hour"] == pytest.approx(len(done) * 3600 / seconds, rel=1e-2)
    failed = [r for r in records if r["status"] != "done"]
    assert failed and all("peak_memory_mb" not in r for r in failed)


def test_inputs_unchanged_and_nothing_written_outside_the_output_folder(folder_run):
    root, out = folder_run["root"], folder_run["out"]
    assert tree_state(root, skip=out) == folder_run["before"]
    left_over = [p for p in out.rglob("*") if p.name.endswith(".part")]
    assert not left_over


def test_running_again_does_no_model_work_skips_everything_and_exits_0(folder_run):
    out = folder_run["out"]
    outputs_before = tree_state(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    proc = run_pasd(*folder_run["command"], cwd=folder_run["work"], env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert proc.returncode == 0, proc.stderr
    records, summary = json_lines(proc.stdout)
    assert {r["status"] for r in records} == {"skipped"} and summary["skipped"] == len(records)
    assert len(records) == len(GOOD) + len(BAD) + len(HIDDEN)
    assert {"torch", "diffusers"}.isdisjoint(imported_modules(proc.stderr))
    assert "loading PASD" not in proc.stderr
    assert tree_state(out) == outputs_before
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes
    assert tree_state(folder_run["root"], skip=out) == folder_run["before"]
    # Known failures are skipped only while unchanged; --retry-failed tries them again.
    retry = run_pasd(*folder_run["command"], "--retry-failed", "--dry-run", cwd=folder_run["work"])
    assert retry.returncode == 1
    statuses = {Path(r["input"]).name: r["status"] for r in json_lines(retry.stdout)[0]}
    # A dry run reads headers only: the truncated JPEG would be tried again and fail on decoding.
    assert {name: statuses[name] for name in BAD} == {name: "failed" for name in BAD} | {"truncated.jpg": "planned"}


def test_dry_run_json_plans_without_loading_weights(folder_run, tmp_path):
    out = tmp_path / "planned"
    proc = run_pasd(
        "upscale",
        folder_run["photos"],
        "-o",
        out,
        *NAMING,
        *FAST,
        *MODEL,
        "--json",
        "--dry-run",
        cwd=folder_run["work"],
        env={"PYTHONPROFILEIMPORTTIME": "1"},
    )
    assert proc.returncode == 1  # some inputs would fail
    records, summary = json_lines(proc.stdout)
    by_name = {Path(r["input"]).name: r for r in records}
    for name, (size, _) in GOOD.items():
        record = by_name[Path(name).name]
        assert record["status"] == "planned" and record["output"] == str(out / expected_output(name))
        assert record["output_size"] == list(size)
    # Headers only: the truncated JPEG looks fine until it is decoded.
    assert by_name["truncated.jpg"]["status"] == "planned"
    assert summary["planned"] == len(GOOD) + 1 and summary["failed"] == len(BAD) - 1
    assert {"torch", "diffusers", "transformers"}.isdisjoint(imported_modules(proc.stderr))
    assert not out.exists()
    assert tree_state(folder_run["root"], skip=folder_run["out"]) == folder_run["before"]
    # Against the existing outputs: every good file is skipped, or planned again with overwrite.
    again = run_pasd(*folder_run["command"], "--dry-run", "--on-exists", "overwrite", cwd=folder_run["work"])
    statuses = {Path(r["input"]).name: r["status"] for r in json_lines(again.stdout)[0]}
    assert all(statuses[Path(name).name] == "planned" for name in GOOD)
    error = run_pasd(*folder_run["command"], "--dry-run", "--on-exists", "error", cwd=folder_run["work"])
    reasons = {Path(r["input"]).name: r["reason"] for r in json_lines(error.stdout)[0]}
    assert error.returncode == 1 and all("output exists" in reasons[Path(name).name] for name in GOOD)


def _make(path: Path, size=(16, 16), fmt=None, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, fmt)
    return path


def test_collisions_are_refused_before_any_work(tmp_path):
    _make(tmp_path / "in" / "a.jpg")
    _make(tmp_path / "in" / "a.png")
    _make(tmp_path / "in" / "b.png")
    out = tmp_path / "out"
    plan = run_pasd("upscale", tmp_path / "in", "-o", out, "--dry-run", "--json")
    assert plan.returncode == 2
    records, _ = json_lines(plan.stdout)
    assert {Path(r["input"]).name: r["status"] for r in records} == {
        "a.jpg": "collision",
        "a.png": "collision",
        "b.png": "planned",
    }
    run = run_pasd("upscale", tmp_path / "in", "-o", out, *MODEL, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert run.returncode == 2 and "collision" in run.stderr and "a.jpg" in run.stderr
    assert "torch" not in imported_modules(run.stderr) and not out.exists()
    # {ext} tells them apart; writing over an input is a collision too.
    fixed = run_pasd("upscale", tmp_path / "in", "-o", out, "--name", "{stem}_{ext}", "--dry-run")
    assert fixed.returncode == 0, fixed.stderr
    onto_input = run_pasd("upscale", tmp_path / "in" / "b.png", "-o", tmp_path / "in", "--dry-run")
    assert onto_input.returncode == 2 and "over the input" in onto_input.stderr


def test_globs_stdin_lists_and_fail_fast(tmp_path):
    photos = tmp_path / "in"
    _make(photos / "A.JPG", fmt="JPEG")
    _make(photos / "b.jpeg", fmt="JPEG")
    _make(photos / "c.png")
    (photos / "d.png").write_text("not a picture")
    out = tmp_path / "out"
    glob_plan = run_pasd("upscale", str(photos / "*.jpg"), str(photos / "*.JPEG"), "-o", out, "--dry-run", "--json")
    assert sorted(Path(r["input"]).name for r in json_lines(glob_plan.stdout)[0]) == ["A.JPG", "b.jpeg"]
    listed = f"{photos / 'c.png'}\n\n{photos / 'A.JPG'}\n{photos / 'missing.png'}\n"
    stdin_plan = subprocess.run(
        [*pasd_command(), "upscale", "-", "-o", str(out), "--dry-run", "--json"],
        input=listed,
        capture_output=True,
        text=True,
        timeout=60,
    )
    records, summary = json_lines(stdin_plan.stdout)
    assert [(Path(r["input"]).name, r["status"]) for r in records] == [
        ("c.png", "planned"),
        ("A.JPG", "planned"),
        ("missing.png", "failed"),
    ]
    assert stdin_plan.returncode == 1
    fail_fast = run_pasd("upscale", photos, "-o", out, "--dry-run", "--json", "--fail-fast", "--name", "{stem}_{ext}")
    statuses = [(Path(r["input"]).name, r["status"]) for r in json_lines(fail_fast.stdout)[0]]
    assert (
        statuses == [("A.JPG", "planned"), ("b.jpeg", "planned"), ("c.png", "planned"), ("d.png", "failed")]
        and fail_fast.returncode == 1
    )
    first_bad = run_pasd("upscale", photos / "d.png", photos / "c.png", "-o", out, "--dry-run", "--json", "--fail-fast")
    assert [r["status"] for r in json_lines(first_bad.stdout)[0]] == ["failed", "cancelled"]


def test_output_folder_inside_the_input_folder(tmp_path):
    photos = tmp_path / "in"
    _make(photos / "a.png")
    _make(photos / "out" / "mine.png")  # a user's file that happens to sit there
    earlier = _make(photos / "out" / "a.png")
    with Image.open(earlier) as image:  # what an earlier run wrote: it carries pasd's record
        from pasd_cli.imageio.metadata import png_info

        image.save(earlier, pnginfo=png_info({}, b"", {"command": "upscale"}))
    proc = run_pasd("upscale", photos, "-r", "-o", photos / "out", "--dry-run", "--json", "--name", "{stem}_2")
    statuses = {
        Path(r["input"]).relative_to(photos).as_posix(): (r["status"], r["reason"]) for r in json_lines(proc.stdout)[0]
    }
    assert statuses == {
        "a.png": ("planned", None),
        "out/mine.png": ("planned", None),
        "out/a.png": ("skipped", "written by pasd (inside the output folder)"),
    }
    assert proc.returncode == 0


def test_lock_refuses_a_second_run(tmp_path):
    photo = _make(tmp_path / "a.png")
    lock = tmp_path / "pasd.lock"
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        blocked = run_pasd("upscale", photo, "-o", tmp_path / "out", "--lock", lock, "--dry-run")
    assert blocked.returncode == 4 and "holds the lock" in blocked.stderr
    free = run_pasd("upscale", photo, "-o", tmp_path / "out", "--lock", lock, "--dry-run")
    assert free.returncode == 0, free.stderr


def test_single_result_to_stdout(tmp_path):
    photo = _make(tmp_path / "a.webp", size=(16, 12), fmt="WEBP")
    proc = pasd_here("upscale", photo, "-o", "-", *FAST, *MODEL, cwd=tmp_path, text=False)
    assert proc.returncode == 0, proc.stderr.decode()
    with Image.open(io.BytesIO(proc.stdout)) as image:
        assert (image.format, image.size) == ("PNG", (32, 24))
        assert read_record(image)["settings"]["steps"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.webp"]
    two = run_pasd("upscale", photo, _make(tmp_path / "b.png"), "-o", "-")
    assert two.returncode == 2 and "one image" in two.stderr


# SIGTERM goes through the same handler as SIGINT; it costs another model load, so it runs with -m slow.
@pytest.mark.parametrize("sig", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_signal_during_an_image_leaves_no_partial_file_and_exits_130(tmp_path, sig):
    photo = _make(tmp_path / "in" / "a.png", size=(32, 32))
    before = tree_state(tmp_path)
    out = tmp_path / "out"
    command = [
        *pasd_command(),
        "upscale",
        str(photo),
        "-o",
        str(out),
        "-v",
        "--json",
        *MODEL,
        "--steps",
        "200",
        "--guidance",
        "1",
        "--process-size",
        "64",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:  # the model is loaded and denoising when steps are reported
            lines.append(line)
            if line.strip().startswith("step"):
                break
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    stderr = "".join(lines) + stderr
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and f"interrupted by {sig.name}" in stderr
    records, summary = json_lines(stdout)
    assert [r["status"] for r in records] == ["interrupted"]
    assert not out.exists() or not list(out.rglob("*"))  # no output, no temporary file
    assert tree_state(tmp_path) == before


def test_full_disk_is_exit_4_and_leaves_no_temporary_file(tmp_path):
    """RLIMIT_FSIZE makes writes fail as on a full disk (EFBIG, like ENOSPC)."""
    photo = _make(tmp_path / "in" / "a.png")
    out = tmp_path / "out"

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    proc = subprocess.run(
        [*pasd_command(), "upscale", str(photo), "-o", str(out), *FAST, *MODEL],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=small_files,
    )
    assert proc.returncode == 4, proc.stderr
    assert "disk full" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(out.rglob("*"))
