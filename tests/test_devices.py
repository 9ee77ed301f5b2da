"""The device paths.

Everywhere: the precision flags (on the torch in use, and with the new precision API absent as
on torch 2.5-2.8, the oldest pyproject.toml allows), the tensor layout handed to the networks,
and the memory budgets on CUDA and MPS (torch's device calls stood in for).

`gpu`: the real paths on CUDA or MPS, each against the CPU (`python -m pytest -m gpu`, or
benchmarks/gpu_check.sh with the speed benchmark). They run only where torch sees a GPU;
PASD_TEST_GPU_DEVICE=cpu runs them on the CPU against itself instead, to check the tests where no
GPU is lent (the one that fills CUDA's memory stays skipped)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import LR_INPUT, REFERENCE_ARGS, TINY_BASE, TINY_PASD, run_pasd, tiny_model_args
from faults import poison_unet
from PIL import Image

from pasd_cli.cli.runtime import VAE_MEMORY_SHARE, memory_budget, use_true_fp32
from pasd_cli.engine.pipeline import PASDPipeline, image_to_tensor
from pasd_cli.engine.precision import supports_bf16
from pasd_cli.engine.settings import UpscaleSettings
from pasd_cli.engine.vae import choose_vae_tile, vae_peak_bytes
from pasd_cli.engine.vae_tiling import plan_sections

# -- precision flags ------------------------------------------------------------------------------

# Run in a fresh interpreter: the flags are process-wide. SIMULATE_OLD_TORCH takes the precision
# API away as torch before 2.9 lacked it (no cudnn.fp32_precision / cudnn.conv; matmul refuses
# fp32_precision like any unknown attribute).
_FLAGS_SCRIPT = """
import json, sys, torch
from pasd_cli.cli.runtime import use_true_fp32

if sys.argv[1] == "old":
    del type(torch.backends.cudnn).fp32_precision, type(torch.backends.cudnn).conv
    matmul = type(torch.backends.cuda.matmul)
    get, set_ = matmul.__getattr__, matmul.__setattr__

    def refuse(name):
        if name == "fp32_precision":
            raise AttributeError("Unknown attribute " + name)

    matmul.__getattr__ = lambda self, name: refuse(name) or get(self, name)
    matmul.__setattr__ = lambda self, name, value: refuse(name) or set_(self, name, value)

def snapshot():
    b = torch.backends
    state = {}
    for name, read in [
        ("cudnn.allow_tf32", lambda: b.cudnn.allow_tf32),
        ("matmul.allow_tf32", lambda: b.cuda.matmul.allow_tf32),
        ("cudnn.fp32_precision", lambda: b.cudnn.fp32_precision),
        ("conv.fp32_precision", lambda: b.cudnn.conv.fp32_precision),
        ("rnn.fp32_precision", lambda: b.cudnn.rnn.fp32_precision),
        ("matmul.fp32_precision", lambda: b.cuda.matmul.fp32_precision),
    ]:
        try:
            state[name] = read()
        except AttributeError:
            state[name] = "absent"
        except RuntimeError as exc:
            state[name] = "raises: " + str(exc)[:80]
    return state

use_true_fp32(torch.device("cuda"), torch.float16)
use_true_fp32(torch.device("cpu"), torch.float32)
untouched = snapshot()
use_true_fp32(torch.device("cuda"), torch.float32)
print(json.dumps({"untouched": untouched, "fp32": snapshot()}))
"""


def _flags(torch_api: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _FLAGS_SCRIPT, torch_api], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_fp32_on_cuda_is_ieee_for_every_cudnn_op_and_matmul_and_both_apis_agree():
    """On this torch (2.9+), read through the legacy flags (as torch.compile does) and the new
    API alike; setting the new API for convolutions alone made the legacy read raise."""
    flags = _flags("current")
    assert flags["untouched"]["cudnn.allow_tf32"] is True and flags["untouched"]["conv.fp32_precision"] == "tf32"
    assert flags["fp32"] == {
        "cudnn.allow_tf32": False,
        "matmul.allow_tf32": False,
        "cudnn.fp32_precision": "ieee",
        "conv.fp32_precision": "ieee",
        "rnn.fp32_precision": "ieee",
        "matmul.fp32_precision": "ieee",
    }


def test_fp32_on_cuda_without_the_new_precision_api_sets_the_legacy_flags():
    """torch 2.5-2.8: only the legacy flags exist, and nothing else is touched or created."""
    flags = _flags("old")
    assert flags["untouched"]["cudnn.allow_tf32"] is True
    assert flags["fp32"]["cudnn.allow_tf32"] is False and flags["fp32"]["matmul.allow_tf32"] is False
    for name in ("cudnn.fp32_precision", "conv.fp32_precision", "matmul.fp32_precision"):
        assert flags["fp32"][name] == "absent", name


# -- layout and memory budgets ------------------------------------------------------------------


def test_images_reach_the_networks_contiguous(tiny_pipeline):
    """A permuted view of the interleaved pixels would be channels-last in memory, and the first
    convolutions of the VAE and of the ControlNet's hint encoder would inherit it. The VAE's
    strips choose channels-last for one image on the CPU themselves (vae_strips._networks_layout),
    so its first convolution sees exactly that layout, whatever the image tensor's."""
    image = Image.open(LR_INPUT)
    assert image_to_tensor(image).is_contiguous()
    seen: dict[str, list[tuple[bool, bool]]] = {}

    def record(name, memory_format):
        def hook(module, args, out):
            seen.setdefault(name, []).append(
                (args[0].is_contiguous(memory_format=memory_format), out.is_contiguous(memory_format=memory_format))
            )

        return hook

    vae_conv = tiny_pipeline.vae.vae.encoder.conv_in
    hint_conv = tiny_pipeline.controlnet.controlnet_cond_embedding.conv_in
    assert tiny_pipeline.vae.runs_in_strips
    hooks = [
        vae_conv.register_forward_hook(record("vae", torch.channels_last)),
        hint_conv.register_forward_hook(record("hint", torch.contiguous_format)),
    ]
    try:
        tiny_pipeline.upscale(image, UpscaleSettings(steps=1, guidance=1.0, scale=2, process_size=112, vae_tile=0))
    finally:
        for hook in hooks:
            hook.remove()
    assert set(seen) == {"vae", "hint"}, seen
    assert all(inputs and outputs for calls in seen.values() for inputs, outputs in calls), seen


def test_the_cuda_budget_is_measured_after_emptying_the_cache(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: calls.append("measure") or (8 * 2**30, 80 * 2**30))
    assert memory_budget(torch.device("cuda")) == int(8 * 2**30 * VAE_MEMORY_SHARE)
    assert calls == ["empty_cache", "measure"]


def test_the_mps_budget_is_a_smaller_share_of_unified_memory_measured_after_emptying_the_cache(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: calls.append("measure") or 48 * 2**30)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: calls.append("measure") or 16 * 2**30)
    budget = memory_budget(torch.device("mps"))
    assert calls == ["empty_cache", "measure", "measure"]
    assert budget == int(32 * 2**30 * VAE_MEMORY_SHARE / 2) < 32 * 2**30 * VAE_MEMORY_SHARE
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 64 * 2**30)
    assert memory_budget(torch.device("mps")) == 0


# -- on the device ---------------------------------------------------------------------------------

if os.environ.get("PASD_TEST_GPU_DEVICE"):
    ACCELERATORS = [os.environ["PASD_TEST_GPU_DEVICE"]]
else:
    ACCELERATORS = [
        name
        for name, available in (("cuda", torch.cuda.is_available()), ("mps", torch.backends.mps.is_available()))
        if available
    ]
on_accelerators = pytest.mark.parametrize(
    "device", ACCELERATORS or [pytest.param("cuda", marks=pytest.mark.skip(reason="needs CUDA or MPS"))]
)
# Engine runs, device against CPU: the 400x240 hint of the tiny model (a 50x30 latent).
SMALL = UpscaleSettings(steps=2, guidance=9.0, scale=4, process_size=112, seed=1234, prompt="a tiny test image")


def with_device(args: list[str], device: str, dtype: str = "fp32") -> list[str]:
    args = list(args)
    args[args.index("--device") + 1] = device
    args[args.index("--dtype") + 1] = dtype
    return args if dtype == "fp32" else [a for a in args if a != "--exact"]  # exact mode is fp32


def reference_diff(path, reference) -> torch.Tensor:
    return (image_to_tensor(Image.open(path)).int() - reference["pipeline"]["final_uint8"].int()).abs()


def pixels(image: Image.Image) -> torch.Tensor:
    return image_to_tensor(image).int()


def assert_close(image: torch.Tensor, expected: torch.Tensor, max_levels: int = 2, mean_levels: float = 0.1):
    """fp32 on the device against the CPU: the reference run's tolerance, a little wider for
    runs longer than its two steps (the tiny random model amplifies rounding)."""
    diff = (image - expected).abs()
    assert diff.max() <= max_levels and diff.float().mean() < mean_levels, (diff.max(), diff.float().mean())


def device_pipeline(device: str, dtype=torch.float32, pasd=TINY_PASD) -> PASDPipeline:
    use_true_fp32(torch.device(device), dtype)
    return PASDPipeline.from_folders(pasd, TINY_BASE, torch.device(device), dtype)


@pytest.fixture(scope="module")
def cpu_pipeline():
    return PASDPipeline.from_folders(TINY_PASD, TINY_BASE, torch.device("cpu"), torch.float32)


@pytest.mark.gpu
@on_accelerators
def test_reference_run_on_the_device_matches_the_released_output(tmp_path, reference, device):
    """fp32 on the device: the CPU parity tolerance (max <= 2, mean < 0.05), through the CLI."""
    proc = run_pasd("upscale", LR_INPUT, "-o", tmp_path, *tiny_model_args(), *with_device(REFERENCE_ARGS, device))
    assert proc.returncode == 0, proc.stderr
    diff = reference_diff(tmp_path / "lr_input.png", reference)
    assert diff.max() <= 2 and diff.float().mean() < 0.05, (diff.max(), diff.float().mean())


@pytest.mark.gpu
@on_accelerators
@pytest.mark.parametrize("dtype,mean_levels", [("fp16", 4), ("bf16", 16)])
def test_reduced_precision_on_the_device_stays_close(tmp_path, reference, device, dtype, mean_levels):
    """The GPU default (fp16) and bf16: the same picture, within a few levels on average (the
    tiny random model amplifies rounding; on this CPU fp16 gives < 4, bf16 9.7)."""
    if dtype == "bf16" and not supports_bf16(torch.device(device)):
        pytest.skip(f"{device} has no bfloat16")
    proc = run_pasd(
        "upscale", LR_INPUT, "-o", tmp_path, *tiny_model_args(), *with_device(REFERENCE_ARGS, device, dtype)
    )
    assert proc.returncode == 0, proc.stderr
    diff = reference_diff(tmp_path / "lr_input.png", reference)
    assert diff.float().mean() < mean_levels, diff.float().mean()


@pytest.mark.gpu
@on_accelerators
def test_unipc_beyond_two_steps_on_the_device(device, cpu_pipeline):
    """From its third step UniPC's corrector solves a small system (on the CPU where the device
    lacks the op): 5 steps on the device against the CPU."""
    settings = UpscaleSettings(**{**SMALL.__dict__, "steps": 5})
    steps = []
    result = device_pipeline(device).upscale(
        Image.open(LR_INPUT), settings, progress=lambda stage, done, total: stage == "step" and steps.append(done)
    )
    assert steps == [1, 2, 3, 4, 5]
    assert_close(pixels(result.image), pixels(cpu_pipeline.upscale(Image.open(LR_INPUT), settings).image), 4, 0.25)


@pytest.mark.gpu
@on_accelerators
def test_latent_tiling_on_the_device(device, cpu_pipeline):
    """16-latent tiles with a 4-latent overlap, two tiles per forward pass, on the 50x30 latent."""
    settings = UpscaleSettings(**{**SMALL.__dict__, "latent_tile": 16, "latent_overlap": 4, "tile_batch": 2})
    result = device_pipeline(device).upscale(Image.open(LR_INPUT), settings)
    expected = cpu_pipeline.upscale(Image.open(LR_INPUT), settings)
    assert result.latent_tiles == expected.latent_tiles == 12
    assert_close(pixels(result.image), pixels(expected.image))


@pytest.mark.gpu
@on_accelerators
def test_automatic_tile_batch_on_the_device(device, cpu_pipeline):
    """The automatic batch with the device's measured budget: on CUDA several of the 12 tiles a
    pass, elsewhere one; the same image as the CPU's one tile a pass, within rounding."""
    settings = UpscaleSettings(**{**SMALL.__dict__, "latent_tile": 16, "latent_overlap": 4})
    pipeline = device_pipeline(device)
    pipeline.memory_budget = memory_budget(torch.device(device))
    result = pipeline.upscale(Image.open(LR_INPUT), settings)
    expected = cpu_pipeline.upscale(Image.open(LR_INPUT), settings)
    assert result.latent_tiles == expected.latent_tiles == 12 and expected.tile_batch == 1
    assert result.tile_batch > 1 if device.startswith("cuda") else result.tile_batch == 1
    assert_close(pixels(result.image), pixels(expected.image))


@pytest.mark.gpu
@on_accelerators
def test_automatic_vae_tiling_with_checkpoints_on_the_device(tmp_path, device):
    """A small --vae-memory on a 1600x960 output: the budget fits 384-pixel tiles and leaves room
    for whole-image activations between the decoder's blocks (several sections, so the tiled
    passes skip recomputation). Outside --exact an untiled pass runs in row strips, which need
    less memory than tiles up to about 800x480 (71 against 113 MB here), so the output is larger
    than that. Tiling is exact: the CPU's untiled output, within rounding."""
    from diffusers import AutoencoderKL

    config = AutoencoderKL.load_config(TINY_BASE / "vae")
    config = type("Config", (), config)
    codec = device_pipeline("cpu").vae
    strips = codec.runs_in_strips
    assert strips  # the tiny VAE's layers are stock: the default runs in strips
    height, width = 960, 1600
    budget_mb = math.ceil((vae_peak_bytes(config, height, width, 4, 384, strips) + 8 * 2**20) / 2**20)
    budget = budget_mb * 2**20
    assert choose_vae_tile(config, height, width, 4, budget, strips=strips) == 384
    stages = codec._decoder_stages()
    checkpoint = budget - vae_peak_bytes(config, height, width, 4, 384, strips)
    assert len(plan_sections(stages, (height // 8, width // 8), 4, checkpoint)) > 1

    args = ["--steps", "1", "--guidance", "1", "--scale", "16", "--process-size", "112", "--caption", "none"]
    args += ["--json", *tiny_model_args()]
    runs = {}
    for name, extra in (("device", ["--device", device, "--vae-memory", budget_mb]), ("cpu", ["--vae-tile", "0"])):
        extra = extra if name == "device" else [*extra, "--device", "cpu"]
        proc = run_pasd("upscale", LR_INPUT, "-o", tmp_path / name, *args, *extra, "--dtype", "fp32")
        assert proc.returncode == 0, proc.stderr
        runs[name] = json.loads(proc.stdout.splitlines()[0])
    assert (runs["device"]["vae_tile"], runs["cpu"]["vae_tile"]) == (384, 0)
    assert runs["device"]["output_size"] == [width, height]
    assert_close(
        pixels(Image.open(tmp_path / "device" / "lr_input.png")), pixels(Image.open(tmp_path / "cpu" / "lr_input.png"))
    )


@pytest.mark.gpu
@on_accelerators
@torch.inference_mode()
def test_tiled_vae_on_the_device_equals_the_cpu_untiled(device):
    from diffusers import AutoencoderKL

    from pasd_cli.engine.vae import VaeCodec

    use_true_fp32(torch.device(device), torch.float32)
    image = Image.open(LR_INPUT).convert("RGB").resize((640, 960), Image.Resampling.BICUBIC)
    pixels = image_to_tensor(image)[None]
    cpu = VaeCodec(AutoencoderKL.from_pretrained(TINY_BASE / "vae").eval())
    gpu = VaeCodec(AutoencoderKL.from_pretrained(TINY_BASE / "vae").eval().to(device))
    mean, _ = cpu.encode_moments(pixels)
    tiled_mean, _ = gpu.encode_moments(pixels.to(device), tile=256)
    decoded = cpu.decode(mean)
    tiled_decoded = gpu.decode(mean.to(device), tile=256)
    assert (tiled_mean.cpu() - mean).abs().max() <= 1e-3
    assert (tiled_decoded.cpu() - decoded).abs().max() <= 1e-3


@pytest.mark.gpu
@on_accelerators
@pytest.mark.parametrize("dtype,mean_error,max_error", [(torch.float16, 2e-3, 0.06), (torch.bfloat16, 1.5e-2, 0.45)])
@torch.inference_mode()
def test_tiled_vae_in_reduced_precision_on_the_device(device, dtype, mean_error, max_error):
    """The tiled VAE in fp16 and bf16 on the device (GroupNorm statistics pooled across tiles in
    float64 on the CPU) against the untiled fp32 VAE on the CPU. Bounds about twice what the CPU's
    own tiled fp16 and bf16 give (mean 8.8e-4 / 6.7e-3, max 0.028 / 0.22, the same as untiled)."""
    from diffusers import AutoencoderKL

    from pasd_cli.engine.vae import VaeCodec

    if not supports_bf16(torch.device(device)) and dtype == torch.bfloat16:
        pytest.skip(f"{device} has no bfloat16")
    image = Image.open(LR_INPUT).convert("RGB").resize((640, 960), Image.Resampling.BICUBIC)
    pixels = image_to_tensor(image)[None]
    cpu = VaeCodec(AutoencoderKL.from_pretrained(TINY_BASE / "vae").eval())
    reduced = VaeCodec(AutoencoderKL.from_pretrained(TINY_BASE / "vae").eval().to(device, dtype))
    mean, _ = cpu.encode_moments(pixels)
    tiled_mean, _ = reduced.encode_moments(pixels.to(device), tile=256)
    decoded = cpu.decode(mean)
    tiled_decoded = reduced.decode(mean.to(device), tile=256)
    for got, want in ((tiled_mean.cpu(), mean), (tiled_decoded.cpu(), decoded)):
        error = (got - want).abs()
        assert torch.isfinite(got).all() and error.mean() < mean_error and error.max() < max_error, (
            error.mean(),
            error.max(),
        )


@pytest.mark.gpu
@on_accelerators
def test_finite_latents_check_in_fp16_on_the_device(device, monkeypatch):
    """fp16 on the device passes the check; an overflow injected in fp16 is made again in a
    safer dtype with one warning, never written as a black image."""
    pipeline = device_pipeline(device, torch.float16)
    plain = pipeline.upscale(Image.open(LR_INPUT), SMALL)
    assert plain.dtype == torch.float16 and pixels(plain.image).float().std() > 10
    calls = poison_unet(monkeypatch, {torch.float16})
    warnings = []
    result = pipeline.upscale(Image.open(LR_INPUT), SMALL, on_warning=warnings.append)
    assert torch.float16 in calls and result.dtype in (torch.bfloat16, torch.float32)
    assert len(warnings) == 1 and "float16 overflowed (non-finite latents)" in warnings[0]
    assert pixels(result.image).float().std() > 10


def _fill_cuda_memory(chunks: list[torch.Tensor]) -> None:
    """Allocate until the device refuses: 1 GiB pieces, then 4 MiB ones (given back first)."""
    for size in (2**30, 2**22):
        while True:
            try:
                chunks.append(torch.empty(size, dtype=torch.uint8, device="cuda"))
            except torch.OutOfMemoryError:
                break


@pytest.mark.gpu
@on_accelerators
def test_out_of_memory_retry_against_a_real_device_error(device, cpu_pipeline):
    """Fill CUDA's memory, then give back 32 MiB at a time and upscale a 1600x960 output with the
    VAE asked untiled, until it runs. The untiled decode needs about 590 MB, an 800-pixel tile
    390 MB, a 400-pixel one 165 MB: the first run that fits has met real device errors (out of
    memory, or cuBLAS/cuDNN failing to allocate) and halved the VAE tile."""
    if device != "cuda":
        pytest.skip("filling unified memory would push the whole machine into swap")
    from pasd_cli.engine.memory import is_out_of_memory
    from pasd_cli.errors import DeviceError

    pipeline = device_pipeline(device)
    settings = UpscaleSettings(**{**SMALL.__dict__, "scale": 16, "steps": 1, "guidance": 1.0, "vae_tile": 0})
    chunks: list[torch.Tensor] = []
    result, warnings, attempts = None, [], 0
    try:
        _fill_cuda_memory(chunks)
        assert chunks, "could not allocate anything"
        while chunks and result is None and attempts < 400:
            freed = 0
            while chunks and freed < 2**25:  # 32 MiB (a GiB once the small pieces are gone)
                freed += chunks.pop().numel()
            attempts += 1
            warnings.clear()
            try:
                result = pipeline.upscale(Image.open(LR_INPUT), settings, on_warning=warnings.append)
            except (DeviceError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
                if not isinstance(exc, DeviceError) and not is_out_of_memory(exc):
                    raise
    finally:
        chunks.clear()
        torch.cuda.empty_cache()
    assert result is not None, f"no run fitted after {attempts} attempts"
    assert any("out of memory on cuda" in w for w in warnings), warnings
    assert 0 < result.vae_tile < 1600
    assert pixels(result.image).float().std() > 10
    if result.latent_tiles == 1:  # VAE tiling alone is exact
        assert_close(pixels(result.image), pixels(cpu_pipeline.upscale(Image.open(LR_INPUT), settings).image))


@pytest.mark.gpu
@on_accelerators
@pytest.mark.parametrize("style", ["light", "lora", "fast"])
def test_pasd_light_stylize_with_a_lora_and_fast_mode_on_the_device(device, style, tmp_path):
    """PASD-light as stylize runs it, plain, with a LoRA fused, and in the LCM fast mode (an
    LCM-LoRA, the LCM scheduler's seeded noise, 4 steps without guidance), against the CPU."""
    from tiny_bases import fresh_components, kohya_name, lora_pair, write_kohya_lora

    from pasd_cli.engine.settings import FAST_GUIDANCE, FAST_STEPS, LoraSpec, StylizeSettings
    from pasd_cli.engine.stylize import personalize

    def styled(on: str) -> np.ndarray:
        components = fresh_components()
        layers = {}
        for i, name in enumerate(["down_blocks.0.resnets.0.conv1", "up_blocks.1.attentions.0.proj_in"]):
            down, up = lora_pair(components.unet.get_submodule(name).weight, 4, 90 + i)
            layers[kohya_name(name)] = (down, up, 2.0)
        lora = write_kohya_lora(tmp_path / f"{on}.safetensors", layers)
        personalize(
            components,
            loras=[LoraSpec(str(lora))] if style == "lora" else [],
            lcm_lora=lora if style == "fast" else None,
        )
        overrides = {"steps": FAST_STEPS, "guidance": FAST_GUIDANCE} if style == "fast" else {"steps": 3}
        settings = StylizeSettings(**{"process_size": 64, "seed": 7, **overrides})
        use_true_fp32(torch.device(on), torch.float32)
        pipeline = PASDPipeline(components, torch.device(on), torch.float32)
        assert pipeline.unet.paca_variant == "light"
        return image_to_tensor(pipeline.upscale(Image.open(LR_INPUT), settings).image).int()

    assert_close(styled(device), styled("cpu"), 4, 0.25)
