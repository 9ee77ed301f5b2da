"""`pasd colorize` through the real command on the tiny colorization model: parity with the
released script (`color_public.pt`) with --luma released, the input's luma kept with the default
--luma exact (8 and 16 bits), colour inputs refused and accepted with --force, and a mixed batch
run twice as `upscale` runs it (records, skips, failure memory, exit codes)."""

from __future__ import annotations

import json

import numpy as np
import png
import pytest
from conftest import COLOR_INPUT, COLOR_REFERENCE, TINY_BASE, TINY_COLOR, TINY_LIGHT, pasd_here, run_pasd
from PIL import Image
from test_batch_cli import imported_modules, json_lines

from pasd_cli.engine.colorize import colorize_prompt
from pasd_cli.imageio.metadata import read_record

MODEL = ["--pasd", TINY_COLOR, "--base", TINY_BASE, "--device", "cpu", "--dtype", "fp32", "--caption", "none"]
# The public reference run (reference README, "As a CLI call of the project").
RELEASED_RUN = ["--steps", "2", "--seed", "1234", "--guidance", "9", "--process-size", "64"]
SIDECAR = "a black and white photo of a street"
FAILURES = ".pasd-failures.json"


def fixed_point_luma(rgb: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit Y, as the reference README gives it: (1868 B + 9617 G + 4899 R + 8192) >> 14."""
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    return (1868 * b + 9617 * g + 4899 * r + 8192) >> 14


def float_luma(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def read_png16(path) -> np.ndarray:
    width, height, rows, info = png.Reader(filename=str(path)).read_flat()
    assert info["bitdepth"] == 16, info
    return np.asarray(rows, dtype=np.uint16).reshape(height, width, info["planes"])


def gray16_picture() -> np.ndarray:
    """The public input's grey levels at 16 bits, with sub-8-bit detail an 8-bit path would lose."""
    gray8 = np.asarray(Image.open(COLOR_INPUT).convert("L")).astype(np.int64)
    fine = np.arange(gray8.size).reshape(gray8.shape) % 200
    return np.clip(gray8 * 257 + fine - 100, 0, 65535).astype(np.uint16)


@pytest.fixture(scope="module")
def colour_source(color_reference) -> np.ndarray:
    """The colourful picture the public input was made from (hue sweep, coloured blocks)."""
    return color_reference["public_source_rgb_uint8"].permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, colour_source):
    """A folder of grey pictures of every kind, a colour photo and a broken file, colorized once
    with the defaults (--luma exact)."""
    root = tmp_path_factory.mktemp("colorize")
    photos = root / "in"
    photos.mkdir()
    gray = Image.open(COLOR_INPUT).convert("L")
    gray.save(photos / "gray.png")  # an 'L' file
    (photos / "gray.txt").write_text(SIDECAR)  # its description, through the prompt pre-pass
    Image.open(COLOR_INPUT).save(photos / "gray_rgb.png")  # grey stored as RGB (R = G = B)
    Image.fromarray(gray16_picture()).save(photos / "gray16.png")  # 16-bit grey (I;16)
    with open(photos / "gray16_rgb.png", "wb") as handle:  # 16-bit grey stored as 16-bit RGB
        png.Writer(56, 40, greyscale=False, bitdepth=16).write_array(handle, np.repeat(gray16_picture(), 3).ravel())
    with_alpha = gray.convert("LA")
    with_alpha.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 56).astype(np.uint8), (40, 1))))
    with_alpha.save(photos / "gray_alpha.png")
    Image.fromarray(colour_source).save(photos / "colour.png")
    (photos / "broken.png").write_text("not a picture")
    out = root / "out"
    command = ["colorize", photos, "-o", out, *RELEASED_RUN, *MODEL, "--json", "-v"]
    proc = pasd_here(*command)
    return {"photos": photos, "out": out, "command": command, "proc": proc}


def by_name(stdout: str) -> tuple[dict[str, dict], dict]:
    records, summary = json_lines(stdout)
    return {r["input"].rsplit("/", 1)[1]: r for r in records}, summary


# ---- Must show 1: parity with the released script, through the command line ------------------


def test_released_luma_matches_the_released_script(tmp_path, color_reference):
    gray16 = tmp_path / "gray16.png"
    Image.fromarray(gray16_picture()).save(gray16)
    out = tmp_path / "out"
    proc = pasd_here("colorize", COLOR_INPUT, gray16, "-o", out, *RELEASED_RUN, *MODEL, "--luma", "released", "--json")
    assert proc.returncode == 0, proc.stderr
    records, _ = by_name(proc.stdout)
    written = np.asarray(Image.open(out / "color_public_input.png")).astype(int)
    for reference in (
        color_reference["public"]["final_uint8"].permute(1, 2, 0).numpy(),
        np.asarray(Image.open(COLOR_REFERENCE / "color_public_output.png")),
    ):
        diff = np.abs(written - reference.astype(int))
        assert diff.max() <= 3 and diff.mean() < 0.05, (diff.max(), diff.mean())
    record = records["color_public_input.png"]
    assert record["prompt"] == "" and record["output_size"] == [56, 40] and record["grayscale"] is True
    assert record["luma_shift"] > 1  # the released merge clips, and so moves the luma
    with Image.open(out / "color_public_input.png") as image:
        meta = read_record(image)
    assert meta["command"] == "colorize" and meta["settings"]["luma"] == "released"
    assert meta["settings"]["negative_prompt"] == "b&w, color bleeding" and meta["settings"]["scale"] == 1
    assert meta["model"]["pasd"] == str(TINY_COLOR) and meta["model"]["variant"] == "light"
    assert meta["model"]["scheduler"] == str(TINY_COLOR.parent / "scheduler")
    # fp32 without --exact: the checkpoint's fp16 weights stayed fp16 (and the pixels are the
    # released script's, above).
    assert meta["model"]["half_weights"] is True
    # The released merge is 8-bit: a 16-bit input gets an 8-bit output, and the record says why.
    assert records["gray16.png"]["bits"] == 8 and "--luma released" in records["gray16.png"]["notes"]


# ---- Must show 2 and 3: the input's luma kept, at 8 and 16 bits -------------------------------


def test_exact_luma_is_the_inputs_within_one_level(mixed):
    out, photos = mixed["out"], mixed["photos"]
    records, _ = by_name(mixed["proc"].stdout)
    for name in ("gray.png", "gray_rgb.png"):
        with Image.open(out / name) as image:
            assert (image.mode, image.size) == ("RGB", (56, 40)), name  # grey in, colour out
            rgb = np.asarray(image)
        gray = np.asarray(Image.open(photos / name).convert("L")).astype(np.int64)
        assert np.abs(fixed_point_luma(rgb) - gray).max() <= 1, name
        assert (rgb.max(-1).astype(int) - rgb.min(-1)).max() > 10, name  # it is coloured
        assert records[name]["luma_shift"] <= 1 and records[name]["grayscale"] is True


def test_16_bit_gray_gives_16_bit_rgb_with_the_inputs_luma(mixed):
    records, _ = by_name(mixed["proc"].stdout)
    luma16 = gray16_picture()
    for name in ("gray16.png", "gray16_rgb.png"):
        assert (records[name]["mode"], records[name]["bits"]) == ("RGB", 16), records[name]
        rgb16 = read_png16(mixed["out"] / name)
        assert rgb16.shape == (40, 56, 3)
        assert np.abs(float_luma(rgb16) - luma16).max() <= 1, name
        assert len(np.unique(rgb16 % 257)) > 8  # real 16-bit values, not 8-bit ones times 257
        assert (rgb16.max(-1).astype(int) - rgb16.min(-1)).max() > 10 * 257, name


def test_alpha_metadata_and_prompt_are_kept(mixed):
    out, photos = mixed["out"], mixed["photos"]
    with Image.open(out / "gray_alpha.png") as image:
        assert image.mode == "RGBA"
        alpha = np.asarray(image.getchannel("A"))
    assert np.array_equal(alpha, np.asarray(Image.open(photos / "gray_alpha.png").getchannel("A")))
    records, _ = by_name(mixed["proc"].stdout)
    # The sidecar describes gray.png; the engine's rule turns "black and white" into "color".
    assert records["gray.png"]["prompt_source"] == "sidecar"
    assert records["gray.png"]["prompt"] == colorize_prompt("", label=SIDECAR) == "a color photo of a street, "
    with Image.open(out / "gray.png") as image:
        meta = read_record(image)
    assert meta["prompt"] == "a color photo of a street, " and meta["settings"]["luma"] == "exact"


# ---- Must show 2 and 4: colour inputs refused, a mixed batch as upscale runs it ---------------


def test_colour_input_and_broken_file_fail_with_reasons_and_exit_1(mixed):
    proc, photos = mixed["proc"], mixed["photos"]
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("loading PASD") == 1
    records, summary = by_name(proc.stdout)
    assert records["colour.png"]["status"] == "failed"
    assert "looks like a colour picture" in records["colour.png"]["reason"]
    assert "--force" in records["colour.png"]["reason"]
    assert f"error: {photos / 'colour.png'}: looks like a colour picture" in proc.stderr
    assert records["broken.png"]["status"] == "failed" and "not an image" in records["broken.png"]["reason"]
    done = {name for name, r in records.items() if r["status"] == "done"}
    assert done == {"gray.png", "gray_rgb.png", "gray16.png", "gray16_rgb.png", "gray_alpha.png"}
    assert (summary["done"], summary["failed"]) == (5, 2)
    assert not (mixed["out"] / "colour.png").exists()
    remembered = json.loads((mixed["out"] / FAILURES).read_text())["failures"]
    assert sorted(p.rsplit("/", 1)[1] for p in remembered) == ["broken.png", "colour.png"]


def test_running_again_skips_everything_then_force_colours_the_colour_input(mixed, colour_source):
    out = mixed["out"]
    again = run_pasd(*mixed["command"], env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert again.returncode == 0, again.stderr
    records, summary = by_name(again.stdout)
    assert {r["status"] for r in records.values()} == {"skipped"} and summary["skipped"] == 7
    assert records["colour.png"]["reason"].startswith("failed before and unchanged since: looks like a colour")
    assert "torch" not in imported_modules(again.stderr) and "loading PASD" not in again.stderr

    forced = pasd_here(*mixed["command"], "--force")
    assert forced.returncode == 0, forced.stderr
    records, summary = by_name(forced.stdout)
    assert records["colour.png"]["status"] == "done" and records["colour.png"]["grayscale"] is False
    assert records["broken.png"]["status"] == "skipped"  # still broken: --force is about colour only
    assert (summary["done"], summary["skipped"]) == (1, 6)
    rgb = np.asarray(Image.open(out / "colour.png"))
    source_luma = np.asarray(Image.fromarray(colour_source).convert("L")).astype(np.int64)
    assert np.abs(fixed_point_luma(rgb) - source_luma).max() <= 1  # its luma, with new colours
    remembered = json.loads((out / FAILURES).read_text())["failures"]
    assert [p.rsplit("/", 1)[1] for p in remembered] == ["broken.png"]


def test_dry_run_plans_colour_inputs_and_says_so(mixed, tmp_path):
    proc = run_pasd(
        "colorize",
        mixed["photos"],
        "-o",
        tmp_path / "planned",
        "--dry-run",
        "--caption-only",
        "--json",
        *MODEL,
        env={"PYTHONPROFILEIMPORTTIME": "1"},
    )
    assert proc.returncode == 1, proc.stderr  # the broken file fails on its header
    records, _ = by_name(proc.stdout)
    assert records["colour.png"]["status"] == "planned" and records["broken.png"]["status"] == "failed"
    assert "colour ones are planned too; a run refuses them (see --force)" in proc.stderr
    assert records["gray.png"]["prompt"] == "a color photo of a street, "  # colorize's prompt rule
    assert "loading PASD" not in proc.stderr and not (tmp_path / "planned").exists()


# ---- options and refusals before any work ----------------------------------------------------


def test_options_are_upscales_less_scale_colour_fix_and_added_prompt():
    text = run_pasd("colorize", "-h", env={"COLUMNS": "160"}).stdout
    for option in ("--scale", "--color-fix", "--added-prompt"):
        assert option not in text
    for option in ("--pasd", "--base", "--steps", "--guidance", "--conditioning-scale", "--process-size"):
        assert option in text
    for option in ("--added-noise-level", "--prompt", "--seed", "--caption", "--device", "--dtype", "--force"):
        assert option in text
    assert "--latent-tile" in text and "--latent-overlap" in text and "<exact|released>" in text
    assert "pasd-light-color" in text and "b&w, color bleeding" in text
    scale = run_pasd("colorize", COLOR_INPUT, "-o", "out", "--scale", "2")
    assert scale.returncode == 2 and "--scale" in scale.stderr
    luma = run_pasd("colorize", COLOR_INPUT, "-o", "out", "--luma", "bright")
    assert luma.returncode == 2 and "--luma bright: choose from exact, released" in luma.stderr
    plan = run_pasd("colorize", COLOR_INPUT, "-o", "out", "--dry-run", env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert plan.returncode == 0 and "1 planned" in plan.stderr
    assert {"torch", "diffusers", "transformers"}.isdisjoint(imported_modules(plan.stderr))


def test_a_checkpoint_without_a_scheduler_beside_it_is_refused_before_any_image(tmp_path):
    proc = pasd_here("colorize", COLOR_INPUT, "-o", tmp_path / "out", "--pasd", TINY_LIGHT, *MODEL[2:])
    assert proc.returncode == 3, proc.stderr
    assert "scheduler folder not found" in proc.stderr and "Traceback" not in proc.stderr
    assert "hint: --pasd names the colorization checkpoint folder" in proc.stderr
    assert "loading PASD" not in proc.stderr and not (tmp_path / "out").exists()


def test_upscale_says_once_that_colorize_exists_for_black_and_white_inputs(tmp_path, colour_source):
    from conftest import TINY_PASD

    photos = tmp_path / "in"
    photos.mkdir()
    Image.open(COLOR_INPUT).convert("L").save(photos / "a_gray.png")
    Image.open(COLOR_INPUT).save(photos / "b_gray_rgb.png")
    Image.fromarray(colour_source).save(photos / "c_colour.png")
    upscale = ["upscale", photos, "-o", tmp_path / "out", "--pasd", TINY_PASD, *MODEL[2:]]
    proc = pasd_here(*upscale, "--scale", "1", "--steps", "1", "--process-size", "16", "--json", "-v")
    assert proc.returncode == 0, proc.stderr
    records, _ = by_name(proc.stdout)
    for name in ("a_gray.png", "b_gray_rgb.png"):
        assert records[name]["grayscale"] is True and "pasd colorize" in records[name]["hint"]
    assert "grayscale" not in records["c_colour.png"] and "hint" not in records["c_colour.png"]
    assert proc.stderr.count("pasd colorize") == 1  # said once per run, at -v
    with Image.open(tmp_path / "out" / "a_gray.png") as image:
        assert "hint" not in read_record(image)  # the output's metadata is about the output


def test_a_caption_goes_to_the_engine_through_colorizes_prompt_rule(tmp_path, tiny_blip_dir):
    out = tmp_path / "out"
    proc = pasd_here(
        "colorize",
        COLOR_INPUT,
        "-o",
        out,
        *RELEASED_RUN,
        *MODEL[:-2],
        "--caption",
        "blip",
        "--caption-model",
        tiny_blip_dir,
        "--prompt",
        "black and white",
        "--json",
        env={"PASD_HOME": str(tmp_path / "store")},  # the caption cache stays in the test's folder
    )
    assert proc.returncode == 0, proc.stderr
    record = by_name(proc.stdout)[0]["color_public_input.png"]
    assert record["prompt_source"] == "blip" and record["prompt_text"]
    # The released rule: the caption, then the user's prompt, every "black and white" made "color".
    assert record["prompt"] == colorize_prompt("black and white", caption=record["prompt_text"])
    assert record["prompt"].endswith(" color") and "black and white" not in record["prompt"]
    with Image.open(out / "color_public_input.png") as image:
        assert read_record(image)["prompt"] == record["prompt"]
