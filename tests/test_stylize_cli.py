"""`pasd stylize` through the real command (issue 6): tiny personalized bases, LoRAs and an
LCM-LoRA built at test time from the tiny light model; "exactly" means the same PNG pixels as the
plain `pasd upscale` run with the stylize defaults (conditioning scale 0.7, scale 1).

Identity bases (a base whose stock UNet is the PASD file's own) show that PACA survives a swap
end to end: any PACA tensor lost, re-initialised or blended would change the pixels.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LR_INPUT, TINY_BASE, TINY_LIGHT, pasd_here, run_pasd, tiny_stylize_args
from hub_server import FakeHub, Repo, clean_env
from PIL import Image
from tiny_bases import (
    fresh_components,
    kohya_name,
    lora_pair,
    perturbed,
    render,
    stock_state,
    write_checkpoint,
    write_diffusers_folder,
    write_kohya_lora,
    write_unet_folder,
)

from pasd_cli.imageio.metadata import read_record

SEED = 7
# tiny_bases.render's settings, on the command line.
RUN = ["--steps", "2", "--process-size", "64", "--seed", str(SEED), "--device", "cpu", "--dtype", "fp32"]
RANK = 4
LORA_UNET = [
    "down_blocks.0.resnets.0.conv1",
    "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    "mid_block.attentions.0.proj_in",
]
LORA_TEXT = ["encoder.layers.0.self_attn.q_proj"]
LCM_UNET = ["down_blocks.0.attentions.0.proj_in", "up_blocks.3.resnets.2.conv2"]
HUB_BASE = "someone/identity-style"
LCM_REPO = "latent-consistency/lcm-lora-sdv1-5"


def _text_module(text_encoder, name):
    try:
        return text_encoder.get_submodule(name)
    except AttributeError:
        return text_encoder.get_submodule("text_model." + name)


def _malicious_pickle(path: Path, marker: Path) -> Path:
    class CreatesFile:  # unpickling it calls open(marker, "w")
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"state_dict": {"model.diffusion_model.conv_in.weight": CreatesFile()}}, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every base and LoRA the tests use, written once."""
    root = tmp_path_factory.mktemp("stylize")
    components = fresh_components()
    stock = stock_state(components)
    vae_state, text_state = components.vae.state_dict(), components.text_encoder.state_dict()
    lora_layers, manual = {}, []
    for i, name in enumerate(LORA_UNET):
        down, up = lora_pair(components.unet.get_submodule(name).weight, RANK, 60 + i)
        lora_layers[kohya_name(name)] = (down, up, RANK / 2)
        manual.append(("unet", name, down, up))
    for i, name in enumerate(LORA_TEXT):
        down, up = lora_pair(_text_module(components.text_encoder, name).weight, RANK, 70 + i)
        lora_layers[kohya_name(name, text_encoder=True)] = (down, up, RANK / 2)
        manual.append(("text_encoder", name, down, up))
    lcm_layers = {}
    for i, name in enumerate(LCM_UNET):
        down, up = lora_pair(components.unet.get_submodule(name).weight, RANK, 80 + i)
        lcm_layers[kohya_name(name)] = (0.2 * down, up, 2.0)
    (root / "work").mkdir()
    return {
        "root": root,
        "style": write_checkpoint(root / "style.safetensors", components, unet_state=perturbed(stock, seed=1)),
        "same": write_checkpoint(root / "same.safetensors", components),
        "unet_folder": write_unet_folder(root / "dreambooth-unet", stock),
        "diffusers_folder": write_diffusers_folder(root / "identity-style", stock, vae_state, text_state),
        "lora": write_kohya_lora(root / "style-lora.safetensors", lora_layers),
        "lora_manual": manual,
        "lcm": write_kohya_lora(root / "lcm.safetensors", lcm_layers),
    }


@pytest.fixture(scope="module")
def hub(files):
    """A loopback hub with the identity base in diffusers layout, next to files a base download
    must never fetch, and a tiny LCM-LoRA in the released repo's layout."""
    folder = files["diffusers_folder"]
    base = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    base.update(
        {
            "unet/diffusion_pytorch_model.bin": b"pickled copy" * 100,
            "identity.ckpt": b"pickle" * 100,
            "safety_checker/config.json": b"{}",
            "safety_checker/model.safetensors": b"\0" * 1000,
            "README.md": b"# identity\n",
        }
    )
    lcm = {"pytorch_lora_weights.safetensors": files["lcm"].read_bytes(), "README.md": b"# LCM-LoRA\n"}
    with FakeHub({HUB_BASE: Repo(base), LCM_REPO: Repo(lcm)}) as server:
        yield server


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def stylize(files, name: str, *args, env: dict | None = None) -> tuple[np.ndarray, dict]:
    """One `pasd stylize` run on the test image with the tiny model: (pixels, metadata record)."""
    out = files["root"] / name
    run = run_pasd if env else pasd_here  # libraries read the hub's address once, at import
    proc = run("stylize", LR_INPUT, "-o", out, *tiny_stylize_args(), *RUN, *args, env=env, cwd=files["root"] / "work")
    assert proc.returncode == 0, proc.stderr
    written = out / "lr_input.png"
    assert proc.stdout.strip() == str(written) or '"status": "done"' in proc.stdout
    with Image.open(written) as image:
        record = read_record(image)
    return pixels(written), record


@pytest.fixture(scope="module")
def plain(files):
    """The plain `pasd upscale` output with the stylize defaults spelled out."""
    out = files["root"] / "plain"
    proc = pasd_here(
        "upscale",
        LR_INPUT,
        "-o",
        out,
        "--pasd",
        TINY_LIGHT,
        "--base",
        TINY_BASE,
        "--scale",
        "1",
        "--conditioning-scale",
        "0.7",
        "--caption",
        "none",
        *RUN,
    )
    assert proc.returncode == 0, proc.stderr
    return pixels(out / "lr_input.png")


def imported_modules(stderr: str) -> set[str]:
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def one_error(proc, code: int = 3) -> str:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


# ---- Must show 1: single-file checkpoints, offline; --blend 0 is the plain output -----------------


def test_blend_0_on_a_checkpoint_with_the_same_vae_and_text_encoder_reproduces_upscale_exactly(files, plain):
    styled, record = stylize(files, "blend0", "--style", files["style"], "--blend", "0")
    assert np.array_equal(styled, plain)
    assert record["model"]["base"]["kind"] == "single-file" and record["model"]["base"]["blend"] == 0.0


def test_single_file_checkpoint_loads_offline_and_changes_the_output(files, plain, hub):
    """No --offline: the network is allowed, and the loopback hub (HF_ENDPOINT) must see nothing."""
    before = len(hub.requests)
    styled, record = stylize(files, "style", "--style", files["style"], env=clean_env(files["root"], hub))
    assert len(hub.requests) == before
    assert np.abs(styled - plain).mean() > 1.0
    assert record["command"] == "stylize"
    assert record["settings"]["conditioning_scale"] == 0.7 and record["settings"]["scale"] == 1.0
    model = record["model"]
    assert model["base"] == {
        "spec": str(files["style"]),
        "path": str(files["style"]),
        "kind": "single-file",
        "blend": 1.0,
        "replaced": ["vae", "text_encoder"],
    }
    assert model["sd15"] == str(TINY_BASE) and model["pasd"] == str(TINY_LIGHT) and model["variant"] == "light"
    assert model["loras"] == [] and model["lcm_lora"] is None


# ---- Must show 2 and 3: LoRAs; PACA survives every kind of swap -----------------------------------


def test_identity_unet_folder_with_lora_weight_0_reproduces_upscale_exactly(files, plain):
    """A UNet-only folder (the released code re-initialises PACA for these) and a LoRA at weight 0."""
    styled, record = stylize(files, "lora0", "--style", files["unet_folder"], "--lora", f"{files['lora']}:0")
    assert np.array_equal(styled, plain)
    assert record["model"]["base"]["kind"] == "unet-folder" and record["model"]["base"]["replaced"] == []
    assert record["model"]["loras"] == [{"path": str(files["lora"]), "weight": 0.0}]


def _merged_render(files, factor: float) -> np.ndarray:
    """The oracle: the LoRA merged by hand, W + factor * up @ down, then the same pipeline."""
    components = fresh_components()
    with torch.no_grad():
        for part, name, down, up in files["lora_manual"]:
            module = (
                components.unet.get_submodule(name) if part == "unet" else _text_module(components.text_encoder, name)
            )
            delta = up @ down if down.dim() == 2 else torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
            module.weight += factor * delta
    return render(components, seed=SEED).astype(np.int16)


def test_lora_weight_1_with_alpha_half_the_rank_is_a_half_merge(files, plain):
    styled, record = stylize(files, "lora1", "--style", files["same"], "--lora", files["lora"])
    assert record["model"]["loras"] == [{"path": str(files["lora"]), "weight": 1.0}]
    half = _merged_render(files, 0.5)
    assert np.abs(styled - half).max() <= 1  # the merged weights agree to ~1e-7
    assert np.abs(styled - plain).mean() > 1.0
    # The comparison can fail: a merge that ignored alpha / rank gives another image.
    assert np.abs(styled - _merged_render(files, 1.0)).mean() > 1.0


# ---- hub repo ids as bases --------------------------------------------------------------------------


def test_hub_base_downloads_only_its_parts_then_runs_offline(files, plain, hub):
    env = clean_env(files["root"] / "hub-run", hub)
    hub.requests.clear()
    proc = run_pasd("download", HUB_BASE, env=env)
    assert proc.returncode == 0, proc.stderr
    folder = files["root"] / "hub-run" / "store" / "hub--someone--identity-style"
    assert proc.stdout.strip() == str(folder)
    tokenizer = [f"tokenizer/{p.name}" for p in (TINY_BASE / "tokenizer").iterdir()]
    expected = [
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        *tokenizer,
    ]
    assert Counter(hub.downloads()) == Counter(f"{HUB_BASE}/{p}" for p in expected)

    hub.requests.clear()
    styled, record = stylize(files, "hub", "--style", HUB_BASE, "--offline", env=env)
    assert hub.requests == []
    assert np.array_equal(styled, plain)
    assert record["model"]["base"]["kind"] == "diffusers-folder"
    assert record["model"]["base"]["path"] == str(folder)
    assert set(record["model"]["base"]["replaced"]) == {"vae", "text_encoder", "tokenizer"}


def test_hub_base_not_downloaded_without_a_terminal_names_the_command(files, hub):
    env = clean_env(files["root"] / "no-terminal", hub)
    hub.requests.clear()
    proc = run_pasd(
        "stylize",
        LR_INPUT,
        "-o",
        files["root"] / "no-terminal" / "out",
        *tiny_stylize_args(),
        *RUN,
        "--style",
        HUB_BASE,
        env=env,
    )
    assert f"base {HUB_BASE} not in" in one_error(proc) and "no terminal" in proc.stderr
    assert f"hint: fetch with: pasd download {HUB_BASE}\n" in proc.stderr
    assert hub.requests == []


# ---- --fast ---------------------------------------------------------------------------------------


def test_fast_fuses_the_store_lcm_lora_with_4_steps_and_no_guidance(files, hub):
    from pasd_cli.engine.bases import apply_base
    from pasd_cli.engine.stylize import use_lcm

    env = clean_env(files["root"] / "fast", hub)
    proc = run_pasd("download", "lcm-lora-sdv1-5", env=env)
    assert proc.returncode == 0, proc.stderr
    lcm_file = files["root"] / "fast" / "store" / "lcm-lora-sdv1-5" / "pytorch_lora_weights.safetensors"
    assert lcm_file.read_bytes() == files["lcm"].read_bytes()

    fast = [a for a in RUN if a not in ("--steps", "2")]
    out = files["root"] / "fast" / "out"
    args = ["stylize", LR_INPUT, "-o", out, *tiny_stylize_args(), *fast, "--style", files["same"], "--fast"]
    args.append("--offline")
    proc = run_pasd(*args, "--json", "--name", "{stem}_{steps}", env=env)
    assert proc.returncode == 0, proc.stderr
    with Image.open(out / "lr_input_4.png") as image:
        record = read_record(image)
    assert (record["settings"]["steps"], record["settings"]["guidance"]) == (4, 1.0)
    assert record["model"]["lcm_lora"] == str(lcm_file)

    components = fresh_components()
    apply_base(components, files["same"])
    use_lcm(components, files["lcm"])
    oracle = render(components, seed=SEED, steps=4, guidance=1.0).astype(np.int16)
    assert np.array_equal(pixels(out / "lr_input_4.png"), oracle)

    # In bfloat16 the VAE runs in bfloat16 too, as `pasd upscale --fast` has it.
    proc = pasd_here(*args, "--dtype", "bf16", "--name", "{stem}_bf16", env=env)
    assert proc.returncode == 0, proc.stderr
    with Image.open(out / "lr_input_bf16.png") as image:
        assert read_record(image)["model"]["vae_dtype"] == "bfloat16"


def test_fast_keeps_steps_and_guidance_given_on_the_command_line(files):
    out = files["root"] / "fast-plan"
    args = [
        "stylize",
        LR_INPUT,
        "-o",
        out,
        "--style",
        files["same"],
        "--fast",
        "--dry-run",
        "--json",
        "--name",
        "{stem}_{steps}",
    ]
    default, chosen = run_pasd(*args), run_pasd(*args, "--steps", "6")
    assert json.loads(default.stdout.splitlines()[0])["output"] == str(out / "lr_input_4.png"), default.stderr
    assert json.loads(chosen.stdout.splitlines()[0])["output"] == str(out / "lr_input_6.png"), chosen.stderr
    plain_steps = run_pasd(*[a for a in args if a != "--fast"])
    assert json.loads(plain_steps.stdout.splitlines()[0])["output"] == str(out / "lr_input_20.png")


def test_fast_without_the_lcm_lora_is_exit_3_with_the_download_command(files):
    env = clean_env(files["root"] / "no-lcm", PYTHONPROFILEIMPORTTIME=1)
    proc = run_pasd(
        "stylize",
        LR_INPUT,
        "-o",
        files["root"] / "no-lcm" / "out",
        *tiny_stylize_args(),
        *RUN,
        "--style",
        files["same"],
        "--fast",
        env=env,
    )
    assert "'lcm-lora-sdv1-5' (not installed)" in one_error(proc)
    assert "hint: fetch with: pasd download lcm-lora-sdv1-5\n" in proc.stderr
    assert "torch" not in imported_modules(proc.stderr)


# ---- Must show 4: pickles ---------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["--style", "--lora"])
def test_untrusted_pickle_is_refused_with_exit_3_and_nothing_runs(files, tmp_path, option):
    marker = tmp_path / "payload-ran"
    evil = _malicious_pickle(tmp_path / ("evil.ckpt" if option == "--style" else "evil.pt"), marker)
    base = ["--style", evil] if option == "--style" else ["--style", files["same"], "--lora", f"{evil}:0.5"]
    out = tmp_path / "out"
    proc = run_pasd(
        "stylize", LR_INPUT, "-o", out, *tiny_stylize_args(), *RUN, *base, env={"PYTHONPROFILEIMPORTTIME": "1"}
    )
    assert "is a pickle" in one_error(proc) and "--trust-pickle" in proc.stderr
    assert not marker.exists() and not out.exists()
    assert "torch" not in imported_modules(proc.stderr)  # refused before any model code was loaded


def test_trusted_pickle_is_read_with_restricted_unpickling(files, tmp_path):
    marker = tmp_path / "payload-ran"
    evil = _malicious_pickle(tmp_path / "evil.ckpt", marker)
    out = tmp_path / "out"
    proc = pasd_here("stylize", LR_INPUT, "-o", out, *tiny_stylize_args(), *RUN, "--style", evil, "--trust-pickle")
    assert "restricted unpickling refused" in one_error(proc)
    assert not marker.exists() and not (out / "lr_input.png").exists()


def test_payload_is_live(tmp_path):
    """The pickle tests can fail: unrestricted unpickling of the same file runs the payload."""
    marker = tmp_path / "payload-ran"
    torch.load(_malicious_pickle(tmp_path / "evil.ckpt", marker), weights_only=False)
    assert marker.exists()


# ---- refusals before anything heavy, dry runs, and the options ---------------------------------------


def _lora_as_base(folder: Path) -> Path:
    from safetensors.torch import save_file

    save_file(
        {
            "lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3),
            "lora_unet_conv_in.lora_up.weight": torch.zeros(16, 2, 1, 1),
        },
        str(folder / "a_lora.safetensors"),
    )
    return folder / "a_lora.safetensors"


def _sdxl(folder: Path) -> Path:
    from safetensors.torch import save_file

    save_file(
        {
            "model.diffusion_model.conv_in.weight": torch.zeros(1),
            "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(1),
        },
        str(folder / "sdxl.safetensors"),
    )
    return folder / "sdxl.safetensors"


def _empty_folder(folder: Path) -> Path:
    (folder / "empty").mkdir()
    return folder / "empty"


@pytest.mark.parametrize(
    "make,message",
    [
        (_lora_as_base, "is a LoRA, not a base model"),
        (_sdxl, "is a SDXL checkpoint"),
        (_empty_folder, "neither a diffusers model folder"),
        (lambda folder: folder / "missing.safetensors", "no such file or folder"),
        (lambda folder: "pasd", "'pasd' is a pasd model, not a base"),
    ],
    ids=["lora", "sdxl", "empty-folder", "missing", "pasd-model"],
)
def test_wrong_bases_are_refused_before_loading(tmp_path, make, message):
    proc = run_pasd(
        "stylize",
        LR_INPUT,
        "-o",
        tmp_path / "out",
        *tiny_stylize_args(),
        "--style",
        make(tmp_path),
        env={"PYTHONPROFILEIMPORTTIME": "1"},
    )
    assert message in one_error(proc)
    assert "torch" not in imported_modules(proc.stderr) and not (tmp_path / "out").exists()


def test_dry_run_plans_without_torch(files):
    out = files["root"] / "plan"
    proc = run_pasd(
        "stylize",
        LR_INPUT,
        "-o",
        out,
        "--style",
        files["style"],
        "--lora",
        f"{files['lora']}:0.8",
        "--dry-run",
        "--json",
        "--scale",
        "2",
        env={"PYTHONPROFILEIMPORTTIME": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.splitlines()[0])
    assert record["status"] == "planned" and record["output_size"] == [200, 120]
    assert {"torch", "diffusers"}.isdisjoint(imported_modules(proc.stderr))
    assert not out.exists()


def test_options_of_stylize_and_upscale():
    stylize_help, upscale_help = run_pasd("stylize", "--help").stdout, run_pasd("upscale", "--help").stdout
    for option in ("--style", "--base", "--lora", "--blend", "--fast", "--trust-pickle"):
        assert option in stylize_help, option
    assert "--base" in upscale_help and "--style" not in upscale_help and "--lora" not in upscale_help
    missing = run_pasd("stylize", LR_INPUT, "-o", "out", "--dry-run")
    assert missing.returncode == 2 and "--style" in missing.stderr
    bad_weight = run_pasd("stylize", LR_INPUT, "-o", "out", "--style", "x.safetensors", "--lora", "l.safetensors:nan")
    assert bad_weight.returncode == 2 and "finite" in bad_weight.stderr


# ---- batches: everything about them is as for `pasd upscale` ------------------------------------------


def test_a_folder_is_a_batch_with_json_records_and_a_rerun_skips_it_all(tmp_path):
    """Three images and a text file named .png in a folder; the tiny SD 1.5 folder as the base."""
    photos = tmp_path / "in"
    photos.mkdir()
    sizes = {"a.png": (16, 16), "b.jpg": (20, 16), "c.webp": (16, 24)}
    for i, (name, (width, height)) in enumerate(sizes.items()):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(photos / name)
    (photos / "notes.png").write_text("not a picture\n")
    out = tmp_path / "out"
    command = [
        "stylize",
        photos,
        "-o",
        out,
        "--style",
        TINY_BASE,
        *tiny_stylize_args(),
        "--steps",
        "1",
        "--guidance",
        "1",
        "--process-size",
        "16",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--json",
    ]
    proc = pasd_here(*command)
    assert proc.returncode == 1, proc.stderr  # one input failed
    assert proc.stderr.count("loading PASD") == 1  # the model is loaded once for the whole batch
    objects = [json.loads(line) for line in proc.stdout.splitlines()]
    records, summary = objects[:-1], objects[-1]
    assert [r["type"] for r in records] == ["image"] * 4 and summary["type"] == "summary"
    by_name = {Path(r["input"]).name: r for r in records}
    assert sorted(by_name) == ["a.png", "b.jpg", "c.webp", "notes.png"]
    for name, size in sizes.items():
        record = by_name[name]
        written = out / (Path(name).stem + ".png")
        assert (record["status"], record["output"]) == ("done", str(written)), record
        assert record["output_size"] == list(size)  # scale 1: the input's size
        with Image.open(written) as image:
            assert image.size == size
            assert read_record(image)["command"] == "stylize"
    assert by_name["notes.png"]["status"] == "failed" and "not an image" in by_name["notes.png"]["reason"]
    assert (summary["total"], summary["done"], summary["failed"], summary["skipped"]) == (4, 3, 1, 0)

    mtimes = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    again = pasd_here(*command)
    assert again.returncode == 0, again.stderr  # the known failure is skipped while unchanged
    objects = [json.loads(line) for line in again.stdout.splitlines()]
    assert [r["status"] for r in objects[:-1]] == ["skipped"] * 4
    assert (objects[-1]["total"], objects[-1]["skipped"]) == (4, 4)
    assert "loading PASD" not in again.stderr
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
