"""Prompts from the image through the real `pasd upscale` command (issue 7): tiny random BLIP and
ResNet models built at test time, served by the loopback hub and installed in a store; the tiny
PASD model from the reference bundle.

Every run keeps HF_ENDPOINT on the loopback hub: the store is complete, so none may make a
request."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import LR_INPUT, REFERENCE, REFERENCE_ARGS, TINY_BASE, TINY_LIGHT, pasd_here, run_pasd, tiny_model_args
from hub_server import FakeHub, clean_env, tiny_hub_repos
from PIL import Image
from test_parity_pipeline import SETTINGS, assert_images_close
from tiny_captioners import build_tiny_resnet, confident, one_torch_thread

from pasd_cli.engine import ADDED_PROMPT
from pasd_cli.engine.captions import DescriberSpec, Description
from pasd_cli.engine.pipeline import image_to_tensor
from pasd_cli.imageio import read_rgb
from pasd_cli.imageio.metadata import read_record
from pasd_cli.prompts.cache import CaptionCache, image_digest
from pasd_cli.store import Store, load_manifests
from pasd_cli.store.hub import download

MANIFESTS = load_manifests()
BLIP, RESNET = MANIFESTS["blip"], MANIFESTS["resnet-50"]
MODEL = [*tiny_model_args(), "--device", "cpu", "--dtype", "fp32"]
FAST = ["--scale", "2", "--steps", "1", "--guidance", "1", "--process-size", "16"]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def hub(tiny_blip_dir, tmp_path_factory):
    resnet = build_tiny_resnet(tmp_path_factory.mktemp("resnet") / "resnet", confident(1))  # "tabby", p = 0.5
    with FakeHub(tiny_hub_repos(REFERENCE, {BLIP.repo_id: tiny_blip_dir, RESNET.repo_id: resnet})) as server:
        yield server


@pytest.fixture(scope="module")
def home(hub, tmp_path_factory) -> Path:
    """A folder whose store/ holds the tiny captioner and classifier, installed from the hub."""
    home = tmp_path_factory.mktemp("home")
    store = Store(home / "store")
    for name in ("blip", "resnet-50"):
        download(store, name, endpoint=hub.url)
    return home


def pasd_run(home: Path, hub: FakeHub, *args, process: bool = False, **kwargs):
    """`pasd` with the store in home/store; asserts that it made no request to the hub. In this
    process unless `process`: the libraries read the hub's address once, at import, so a request
    here would go to the default hub, which this machine cannot reach, and fail the run."""
    before = len(hub.requests)
    proc = (run_pasd if process else pasd_here)(*args, env=clean_env(home, hub), **kwargs)
    assert len(hub.requests) == before, hub.requests[before:]
    return proc


def json_lines(stdout: str) -> tuple[dict[str, dict], dict]:
    objects = [json.loads(line) for line in stdout.splitlines()]
    assert objects[-1]["type"] == "summary"
    return {Path(o["input"]).name: o for o in objects[:-1]}, objects[-1]


def store_captioner(home: Path, name: str = "blip"):
    kind = {"blip": "blip", "resnet-50": "classify"}[name]
    folder = home / "store" / name
    record = Store(home / "store").read_record(name)
    return DescriberSpec(kind, folder, MANIFESTS[name].repo_id, record.commit)


# ---- Must show 1: the caption reaches the text encoder, combined by the released rules ------------


def test_fixed_caption_becomes_the_released_prompt_and_conditions_the_image(
    home, hub, tmp_path, reference, tiny_pipeline
):
    """The captioner's answer for this image and this captioner (the store's commit) is fixed in the
    cache, so the exact string is known: cleaned ("blurry" -> "clear", "noisy" -> "clean"), then
    " <--prompt>", then the added prompt with NO separator (spec section 5)."""
    caption = "a blurry noisy photo of a dog"
    expected = "a clear clean photo of a dog a tiny test image" + "clean, high-resolution, 8k"
    cache = CaptionCache(home / "store" / "captions")
    cache.put(store_captioner(home).identity(), image_digest(read_rgb(LR_INPUT)), Description(caption=caption))

    out = tmp_path / "out"
    proc = pasd_run(
        home, hub, "upscale", LR_INPUT, "-o", out, *tiny_model_args(), *REFERENCE_ARGS, "--caption", "blip", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    records, summary = json_lines(proc.stdout)
    record = records["lr_input.png"]
    assert record["prompt"] == expected
    assert record["prompt_source"] == "blip" and record["prompt_text"] == caption and record["caption_cached"]
    assert summary["prompts"]["caption_cache_hits"] == 1 and summary["prompts"]["captions_computed"] == 0
    assert "loading captioner" not in proc.stderr  # a cached caption needs no captioner
    written = Image.open(out / "lr_input.png")
    assert read_record(written)["prompt"] == expected  # the output's metadata says so too

    # The pixels are the engine's for that caption, and not the uncaptioned (parity) result.
    ours = image_to_tensor(written)
    captioned = tiny_pipeline.upscale(read_rgb(LR_INPUT), SETTINGS, caption=caption)
    assert captioned.prompt == expected
    assert_images_close(ours, image_to_tensor(captioned.image))
    uncaptioned = reference["pipeline"]["final_uint8"]
    assert (ours.int() - uncaptioned.int()).abs().max() > 10


# ---- Must show 2 and 3: sidecar and CSV prompts win; the second run computes no caption ------------


@pytest.fixture(scope="module")
def photo_batch(home, hub, tmp_path_factory):
    """Small images: a (captioned), b (sidecar; also in the CSV), c (CSV), d (unusable sidecar), e (cut
    short: fails when read for its caption); run twice with the default --caption (blip), the second
    time over the first's outputs."""
    root = tmp_path_factory.mktemp("batch")
    photos = root / "in"
    photos.mkdir()
    lr = read_rgb(LR_INPUT)
    for name, box in {"a": (0, 0, 24, 16), "b": (30, 10, 54, 26), "c": (60, 20, 84, 36), "d": (10, 30, 34, 46)}.items():
        lr.crop(box).save(photos / f"{name}.png")
    (photos / "e.png").write_bytes((photos / "a.png").read_bytes()[:200])
    (photos / "b.txt").write_text("a red barn,\n in snow\n")
    (photos / "d.txt").write_bytes(b"\xff\xfe not UTF-8 \xff")
    prompts = root / "prompts.csv"
    prompts.write_text(
        'file,prompt\nb.png,ignored: the sidecar wins\nin/c.png,"an old portrait, faded"\nmissing.png,a typo\n'
    )
    out = root / "out"
    command = ["upscale", photos, "-o", out, *MODEL, *FAST, "--prompt-file", prompts, "--json"]
    first = pasd_run(home, hub, *command)
    outputs = {p.name: p.read_bytes() for p in out.glob("*.png")}
    second = pasd_run(home, hub, *command, "--on-exists", "overwrite")
    return {"photos": photos, "out": out, "first": first, "outputs": outputs, "second": second}


def test_sidecar_and_prompt_file_override_the_caption(photo_batch, home):
    proc = photo_batch["first"]
    assert proc.returncode == 1, proc.stderr  # d fails: its sidecar is not text; e is not a whole image
    records, summary = json_lines(proc.stdout)
    caption = store_captioner(home).load(CPU, torch.float32).describe(read_rgb(photo_batch["photos"] / "a.png")).caption
    assert caption
    assert records["a.png"]["prompt_source"] == "blip" and records["a.png"]["prompt_text"] == caption
    cleaned = caption.replace("blurry", "clear").replace("noisy", "clean")
    assert records["a.png"]["prompt"] == cleaned + ", " + ADDED_PROMPT  # --exact: no separator, as released
    assert records["b.png"]["prompt_source"] == "sidecar"
    assert records["b.png"]["prompt"] == "a red barn, in snow, " + ADDED_PROMPT
    assert records["c.png"]["prompt_source"] == "prompt-file"
    assert records["c.png"]["prompt"] == "an old portrait, faded, " + ADDED_PROMPT
    assert "description" not in records["b.png"] and "description" not in records["c.png"]
    assert records["d.png"]["status"] == "failed" and "not UTF-8" in records["d.png"]["reason"]
    assert records["e.png"]["status"] == "failed" and "cannot decode" in records["e.png"]["reason"]
    assert [records[f"{n}.png"]["status"] for n in "abc"] == ["done"] * 3
    for name in ("a.png", "b.png", "c.png"):  # the prompt used is in each output's metadata
        assert read_record(Image.open(photo_batch["out"] / name))["prompt"] == records[name]["prompt"]
    assert summary["prompts"] == {
        "sidecar": 1,
        "prompt_file": 1,
        "captions_computed": 1,
        "caption_cache_hits": 0,
        "none": 0,
        "caption_cache_write_errors": 0,
    }
    assert "no input matches missing.png" in proc.stderr
    # The captioner was loaded once, and before PASD (it is freed first: never both in memory).
    assert proc.stderr.count("loading captioner blip") == 1
    assert proc.stderr.index("loading captioner blip") < proc.stderr.index("loading PASD")
    # A bad image is remembered as one; a bad sidecar is the text file's fault, not the image's.
    failures = json.loads((photo_batch["out"] / ".pasd-failures.json").read_text())["failures"]
    assert [Path(path).name for path in failures] == ["e.png"]


def test_second_run_computes_no_caption(photo_batch):
    first, _ = json_lines(photo_batch["first"].stdout)
    proc = photo_batch["second"]
    records, summary = json_lines(proc.stdout)
    assert summary["prompts"]["captions_computed"] == 0 and summary["prompts"]["caption_cache_hits"] == 1
    assert "loading captioner" not in proc.stderr
    assert records["a.png"]["caption_cached"] is True and first["a.png"]["caption_cached"] is False
    assert {n: r["prompt"] for n, r in records.items() if r["status"] == "done"} == {
        n: r["prompt"] for n, r in first.items() if r["status"] == "done"
    }
    assert {p.name: p.read_bytes() for p in photo_batch["out"].glob("*.png")} == photo_batch["outputs"]


def test_stylize_after_upscale_reuses_the_caption(photo_batch, home, hub, tmp_path):
    """The cache is keyed by pixels and captioner, not by command: stylizing an image that
    `pasd upscale` captioned computes no caption."""
    out = tmp_path / "styled"
    proc = pasd_run(
        home,
        hub,
        "stylize",
        photo_batch["photos"] / "a.png",
        "-o",
        out,
        "--style",
        TINY_BASE,
        "--pasd",
        TINY_LIGHT,
        "--base",
        TINY_BASE,
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        *FAST,
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    records, summary = json_lines(proc.stdout)
    first, _ = json_lines(photo_batch["first"].stdout)
    assert summary["prompts"]["captions_computed"] == 0 and summary["prompts"]["caption_cache_hits"] == 1
    assert records["a.png"]["prompt"] == first["a.png"]["prompt"]
    assert "loading captioner" not in proc.stderr


# ---- --caption-only: review the prompts, edit them, pass them back -----------------------------


def test_caption_only_prints_a_prompt_file_without_loading_pasd(home, hub, tmp_path):
    out = tmp_path / "out"
    args = [
        "upscale",
        LR_INPUT,
        "-o",
        out,
        "--dry-run",
        "--caption-only",
        "--caption",
        "classify",
        "--prompt",
        "a tiny test image",
        "--device",
        "cpu",
        "--pasd",
        tmp_path / "no-such-checkpoint",
    ]
    expected = "a tiny test image, tabby, " + ADDED_PROMPT
    proc = pasd_run(home, hub, *args)
    assert proc.returncode == 0, proc.stderr
    assert list(csv.reader(io.StringIO(proc.stdout))) == [["file", "prompt"], [str(LR_INPUT), "tabby"]]
    assert f"[classify]: {expected}" in proc.stderr and "loading classifier resnet-50" in proc.stderr
    assert "loading PASD" not in proc.stderr and not out.exists()

    (tmp_path / "prompts.csv").write_text(proc.stdout)  # reviewed, then passed back
    again = pasd_run(home, hub, *args, "--json", "--prompt-file", tmp_path / "prompts.csv", cwd=tmp_path)
    records, summary = json_lines(again.stdout)
    assert again.returncode == 0, again.stderr
    record = records["lr_input.png"]
    assert record["status"] == "planned" and record["prompt_source"] == "prompt-file"
    assert record["prompt"] == expected  # the same prompt as the classifier's
    assert summary["prompts"]["prompt_file"] == 1 and "loading classifier" not in again.stderr

    refused = pasd_run(home, hub, "upscale", LR_INPUT, "-o", out, "--caption-only")
    assert refused.returncode == 2 and "needs --dry-run" in refused.stderr


# ---- Must show 4: offline without the captioner's weights --------------------------------------


@pytest.mark.parametrize("how, mode, model", [("--offline", "blip", "blip"), ("no terminal", "classify", "resnet-50")])
def test_missing_captioner_offline_is_exit_3_naming_both_ways_forward(hub, tmp_path, how, mode, model):
    out = tmp_path / "out"
    flags = ["--offline"] if how == "--offline" else []
    command = ["upscale", LR_INPUT, "-o", out, *MODEL, *FAST, "--caption", mode, *flags]
    proc = pasd_run(tmp_path, hub, *command, process=True)  # a request would reach the test's hub
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"--caption {mode} ({model}) is not available" in errors[0]
    assert ("offline" if how == "--offline" else "no terminal") in errors[0]
    assert f"hint: run `pasd download {model}` to fetch it, or pass --caption none" in proc.stderr
    assert "loading PASD" not in proc.stderr and not out.exists()


def test_no_caption_needed_no_captioner_needed(hub, tmp_path, tiny_blip_dir):
    """An empty store, offline: a batch whose images all have sidecars, or a captioner given as a
    folder, needs no download."""
    photos = tmp_path / "in"
    photos.mkdir()
    shutil.copy(LR_INPUT, photos / "a.png")
    (photos / "a.txt").write_text("a tiny test image")
    common = [
        "upscale",
        photos,
        "-o",
        tmp_path / "out",
        "--dry-run",
        "--caption-only",
        "--offline",
        "--json",
        "--device",
        "cpu",
    ]
    covered = pasd_run(tmp_path, hub, *common)
    assert covered.returncode == 0, covered.stderr
    assert json_lines(covered.stdout)[0]["a.png"]["prompt_source"] == "sidecar"
    folder = pasd_run(tmp_path, hub, *common, "--no-sidecars", "--caption-model", tiny_blip_dir)
    assert folder.returncode == 0, folder.stderr
    record = json_lines(folder.stdout)[0]["a.png"]
    caption = DescriberSpec("blip", tiny_blip_dir, "x").load(CPU, torch.float32).describe(read_rgb(LR_INPUT)).caption
    assert record["prompt_source"] == "blip" and record["prompt_text"] == caption
