"""The same results on CUDA and MPS as on the CPU.

The `gpu` tests run only where torch sees CUDA or MPS (CI has neither); the first test runs
everywhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import LR_INPUT, REFERENCE_ARGS, TINY_BASE, run_pasd, tiny_model_args
from PIL import Image

from pasd_cli.cli.runtime import use_true_fp32
from pasd_cli.engine.pipeline import image_to_tensor


def test_fp32_on_cuda_turns_tf32_off_and_other_choices_leave_it():
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    try:
        conv.fp32_precision, matmul.fp32_precision = "tf32", "tf32"
        use_true_fp32(torch.device("cuda"), torch.float16)
        use_true_fp32(torch.device("cpu"), torch.float32)
        assert (conv.fp32_precision, matmul.fp32_precision) == ("tf32", "tf32")
        use_true_fp32(torch.device("cuda"), torch.float32)
        assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
    finally:
        conv.fp32_precision, matmul.fp32_precision = before


ACCELERATORS = [
    name
    for name, available in (("cuda", torch.cuda.is_available()), ("mps", torch.backends.mps.is_available()))
    if available
]
on_accelerators = pytest.mark.parametrize(
    "device", ACCELERATORS or [pytest.param("cuda", marks=pytest.mark.skip(reason="needs CUDA or MPS"))]
)


def with_device(args: list[str], device: str, dtype: str = "fp32") -> list[str]:
    args = list(args)
    args[args.index("--device") + 1] = device
    args[args.index("--dtype") + 1] = dtype
    return args


def reference_diff(path, reference) -> torch.Tensor:
    return (image_to_tensor(Image.open(path)).int() - reference["pipeline"]["final_uint8"].int()).abs()


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
    proc = run_pasd(
        "upscale", LR_INPUT, "-o", tmp_path, *tiny_model_args(), *with_device(REFERENCE_ARGS, device, dtype)
    )
    assert proc.returncode == 0, proc.stderr
    diff = reference_diff(tmp_path / "lr_input.png", reference)
    assert diff.float().mean() < mean_levels, diff.float().mean()


@pytest.mark.gpu
@on_accelerators
@torch.inference_mode()
def test_tiled_vae_on_the_device_equals_the_cpu_untiled(device):
    from diffusers import AutoencoderKL

    from pasd_cli.engine.vae import VaeCodec

    use_true_fp32(torch.device(device), torch.float32)
    image = Image.open(LR_INPUT).convert("RGB").resize((640, 960), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None]
    cpu = VaeCodec(AutoencoderKL.from_pretrained(TINY_BASE / "vae").eval())
    gpu = VaeCodec(AutoencoderKL.from_pretrained(TINY_BASE / "vae").eval().to(device))
    mean, _ = cpu.encode_moments(pixels)
    tiled_mean, _ = gpu.encode_moments(pixels.to(device), tile=256)
    decoded = cpu.decode(mean)
    tiled_decoded = gpu.decode(mean.to(device), tile=256)
    assert (tiled_mean.cpu() - mean).abs().max() <= 1e-3
    assert (tiled_decoded.cpu() - decoded).abs().max() <= 1e-3
