"""`pasd upscale --fast`: the LCM-LoRA fused into the UNet and the LCM scheduler, as `pasd stylize
--fast` has them (one implementation), 4 steps without guidance: 10x fewer UNet evaluations."""

from __future__ import annotations

import json

import numpy as np
import torch
from conftest import LCM_LAYERS, LR_INPUT, TINY_BASE, TINY_PASD, pasd_here, run_pasd, tiny_model_args
from hub_server import clean_env
from PIL import Image

from pasd_cli.engine import FAST_GUIDANCE, FAST_STEPS, UpscaleSettings, load_pipeline
from pasd_cli.engine.loading import load_components
from pasd_cli.engine.schedulers import SeededLCMScheduler
from pasd_cli.imageio.metadata import read_record
from pasd_cli.store import LCM_LORA, load_manifests
from pasd_cli.store.local import Record, Store, sha256_file

# fp32 as the oracle computes: --dtype auto is bf16 on a CPU with bf16 matrix instructions.
RUN = ["--process-size", "64", "--scale", "2", "--seed", "3", "--caption", "none", "--device", "cpu", "--dtype", "fp32"]


def _unet_evaluations(pipeline, settings) -> tuple[int, np.ndarray]:
    """Samples through the UNet for one image, and the image."""
    count = [0]

    def hook(module, args, kwargs):
        count[0] += (args[0] if args else kwargs["sample"]).shape[0]

    handle = pipeline.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        image = pipeline.upscale(Image.open(LR_INPUT), settings).image
    finally:
        handle.remove()
    return count[0], np.asarray(image)


def test_fast_makes_10x_fewer_unet_evaluations_than_the_default(lcm_file):
    settings = UpscaleSettings(process_size=64, scale=2, seed=3)
    fast_settings = UpscaleSettings(process_size=64, scale=2, seed=3, steps=FAST_STEPS, guidance=FAST_GUIDANCE)
    default, default_image = _unet_evaluations(load_pipeline(TINY_PASD, TINY_BASE), settings)
    fast_pipeline = load_pipeline(TINY_PASD, TINY_BASE, lcm_lora=lcm_file)
    assert fast_pipeline._scheduler_class is SeededLCMScheduler
    fast, fast_image = _unet_evaluations(fast_pipeline, fast_settings)
    assert (default, fast) == (2 * settings.steps, FAST_STEPS)  # CFG pairs, against one pass per step
    assert default >= 5 * fast
    assert fast_image.shape == default_image.shape and fast_image.std() > 1


def test_fast_merges_in_float32_into_half_precision_weights(lcm_file):
    """Loaded in bf16, the fused UNet is the float32 merge rounded once."""
    half = load_pipeline(TINY_PASD, TINY_BASE, dtype=torch.bfloat16, lcm_lora=lcm_file).unet.state_dict()
    full = load_pipeline(TINY_PASD, TINY_BASE, lcm_lora=lcm_file).unet.state_dict()
    stock = load_components(TINY_PASD, TINY_BASE).unet.state_dict()
    for name in LCM_LAYERS:
        key = f"{name}.weight"
        assert not torch.equal(full[key], stock[key])
        merged_from_half = stock[key].to(torch.bfloat16).float() + (full[key] - stock[key])
        assert torch.equal(half[key], merged_from_half.to(torch.bfloat16)), key


def _store_with_lcm(root, lcm_file) -> None:
    """The LCM-LoRA installed in a store at `root`, as `pasd download` leaves it."""
    store = Store(root, load_manifests())
    manifest = store.manifest(LCM_LORA)
    target = store.model_dir(LCM_LORA) / manifest.files[0]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(lcm_file.read_bytes())
    files = {target.name: {"size": target.stat().st_size, "sha256": sha256_file(target)}}
    store.write_record(Record(LCM_LORA, manifest.repo_id, "main", "c" * 40, "", "", files))


def test_upscale_fast_through_the_command(tmp_path, lcm_file):
    env = clean_env(tmp_path)
    _store_with_lcm(tmp_path / "store", lcm_file)
    out = tmp_path / "out"
    args = ["upscale", LR_INPUT, "-o", out, *tiny_model_args(), *RUN, "--fast", "--offline", "--json"]
    proc = pasd_here(*args, "--name", "{stem}_{steps}", env=env)
    assert proc.returncode == 0, proc.stderr
    with Image.open(out / "lr_input_4.png") as image:
        record = read_record(image)
        pixels = np.asarray(image.convert("RGB"))
    assert (record["settings"]["steps"], record["settings"]["guidance"]) == (FAST_STEPS, FAST_GUIDANCE)
    assert record["model"]["lcm_lora"] == str(tmp_path / "store" / LCM_LORA / "pytorch_lora_weights.safetensors")
    settings = UpscaleSettings(process_size=64, scale=2, seed=3, steps=FAST_STEPS, guidance=FAST_GUIDANCE)
    oracle = load_pipeline(TINY_PASD, TINY_BASE, lcm_lora=lcm_file).upscale(Image.open(LR_INPUT), settings).image
    assert np.array_equal(pixels, np.asarray(oracle))
    assert record["model"]["vae_dtype"] == "float32"

    # In bfloat16 the VAE runs in bfloat16 too (half its time on a CPU with bfloat16 instructions).
    proc = pasd_here(*args, "--dtype", "bf16", "--name", "{stem}_bf16", env=env)
    assert proc.returncode == 0, proc.stderr
    with Image.open(out / "lr_input_bf16.png") as image:
        record = read_record(image)
        pixels = np.asarray(image.convert("RGB"))
    assert (record["model"]["dtype"], record["model"]["vae_dtype"]) == ("bfloat16", "bfloat16")
    oracle = load_pipeline(TINY_PASD, TINY_BASE, dtype=torch.bfloat16, lcm_lora=lcm_file, bf16_vae=True)
    assert np.array_equal(pixels, np.asarray(oracle.upscale(Image.open(LR_INPUT), settings).image))

    # Steps and guidance given on the command line stay; the plan names the output by them.
    plan = run_pasd(*args, "--name", "{stem}_{steps}", "--steps", "6", "--dry-run", env=env)
    assert json.loads(plan.stdout.splitlines()[0])["output"] == str(out / "lr_input_6.png"), plan.stderr


def test_upscale_fast_without_the_lcm_lora_is_exit_3_with_the_download_command(tmp_path):
    proc = run_pasd(
        "upscale", LR_INPUT, "-o", tmp_path / "out", *tiny_model_args(), *RUN, "--fast", env=clean_env(tmp_path)
    )
    assert proc.returncode == 3, proc.stderr
    assert "'lcm-lora-sdv1-5' (not installed)" in proc.stderr
    assert "hint: fetch with: pasd download lcm-lora-sdv1-5\n" in proc.stderr
