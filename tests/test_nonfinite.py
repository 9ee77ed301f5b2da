"""No silent black images: an fp16 overflow (NaN/inf latents) makes the image again in bf16, then
fp32, with one warning, or fails it with a clear reason; never is such an image written.

The overflow is injected by wrapping the PASD UNet's forward so that it returns inf in the
dtypes named, as an overflowing merged base or LoRA would; everything else runs for real."""

from __future__ import annotations

import signal

import pytest
import torch
from conftest import LR_INPUT, REFERENCE_ARGS, TINY_BASE, TINY_PASD, tiny_model_args
from faults import poison_unet
from PIL import Image

from pasd_cli.engine.pipeline import PASDPipeline, image_to_tensor
from pasd_cli.engine.settings import UpscaleSettings
from pasd_cli.errors import ModelError
from pasd_cli.imageio.metadata import read_record

SETTINGS = UpscaleSettings(steps=2, guidance=9.0, scale=2, process_size=112, seed=1234, prompt="a tiny test image")
HALF = (torch.float16, torch.bfloat16)


@pytest.fixture
def overflow(monkeypatch):
    """overflow(dtypes, value): the UNet's prediction becomes `value` in those dtypes."""
    return lambda dtypes, value=float("inf"): poison_unet(monkeypatch, dtypes, value)


def _pipeline(dtype) -> PASDPipeline:
    return PASDPipeline.from_folders(TINY_PASD, TINY_BASE, torch.device("cpu"), dtype)


def _pixels(image: Image.Image) -> torch.Tensor:
    return image_to_tensor(image).int()


@pytest.fixture(scope="module")
def made_in_bf16() -> torch.Tensor:
    """What the retry must give: a bf16 run with the weights cast fp32 -> fp16 -> bf16. (A run
    cast fp32 -> bf16 directly differs by about as much as bf16 from fp32, 9 levels on average:
    the tiny random model amplifies any rounding.)"""
    pipeline = _pipeline(torch.float16)
    pipeline.use_dtype(torch.bfloat16)
    return _pixels(pipeline.upscale(Image.open(LR_INPUT), SETTINGS).image)


def test_an_fp16_overflow_is_made_again_in_bf16_with_one_warning(overflow, made_in_bf16):
    calls = overflow({torch.float16})
    pipeline = _pipeline(torch.float16)
    warnings = []
    with torch.inference_mode():  # as a caller may run it; the cast weights stay ordinary tensors
        result = pipeline.upscale(Image.open(LR_INPUT), SETTINGS, on_warning=warnings.append)
    assert not any(p.is_inference() for p in pipeline.unet.parameters())
    assert torch.float16 in calls and result.dtype == pipeline.dtype == torch.bfloat16
    assert warnings == [
        "float16 overflowed (non-finite latents); this image was made in bfloat16, "
        "which the networks keep for the next images"
    ]
    assert pipeline.unet.dtype == pipeline.controlnet.dtype == pipeline.text_encoder.dtype == torch.bfloat16
    assert torch.equal(_pixels(result.image), made_in_bf16)
    # The next image runs in bf16 at once, without a warning.
    warnings.clear()
    assert pipeline.upscale(Image.open(LR_INPUT), SETTINGS, on_warning=warnings.append).dtype == torch.bfloat16
    assert warnings == []


def test_an_overflow_in_bf16_too_ends_in_fp32(overflow):
    calls = overflow(set(HALF))
    warnings = []
    result = _pipeline(torch.float16).upscale(Image.open(LR_INPUT), SETTINGS, on_warning=warnings.append)
    assert result.dtype == torch.float32 and {torch.float16, torch.bfloat16, torch.float32} <= set(calls)
    assert len(warnings) == 1 and "made in float32" in warnings[0]
    assert _pixels(result.image).float().std() > 10  # a picture, not a flat black or white image


def test_non_finite_even_in_fp32_fails_with_a_clear_reason(overflow):
    overflow({*HALF, torch.float32}, float("nan"))
    with pytest.raises(
        ModelError, match=r"non-finite values \(NaN or inf\) in the latents, in float16, bfloat16, float32"
    ):
        _pipeline(torch.float16).upscale(Image.open(LR_INPUT), SETTINGS)


def test_colorization_shares_the_retry(overflow):
    from conftest import COLOR_INPUT, TINY_COLOR

    from pasd_cli.engine.colorize import ColorizeSettings
    from pasd_cli.engine.colorize_loading import load_colorizer

    overflow({torch.float16})
    pipeline = load_colorizer(TINY_COLOR, TINY_BASE, torch.device("cpu"), torch.float16)
    warnings = []
    settings = ColorizeSettings(steps=2, seed=1234, process_size=64)
    result = pipeline.colorize(Image.open(COLOR_INPUT), settings, on_warning=warnings.append)
    assert pipeline.dtype == torch.bfloat16 and len(warnings) == 1 and "float16 overflowed" in warnings[0]
    assert _pixels(result.image).float().std() > 1


def test_a_non_finite_decoded_image_fails_too():
    pipeline = _pipeline(torch.float32)
    hook = pipeline.vae.vae.decoder.conv_out.register_forward_hook(lambda module, args, out: out * float("inf"))
    try:
        with pytest.raises(ModelError, match="in the decoded image, in float32"):
            pipeline.upscale(Image.open(LR_INPUT), SETTINGS)
    finally:
        hook.remove()


# -- through the command line, in this process (so the fault can be injected) ---------------------


def _pasd(capfd, *args) -> tuple[int, str, str]:
    from pasd_cli.cli import main

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as info:
            main([str(a) for a in args])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    out, err = capfd.readouterr()
    return info.value.code or 0, out, err


def _cli_args(tmp_path, dtype: str) -> list:
    args = [a for a in REFERENCE_ARGS if a != "--exact"]  # exact mode is fp32
    args[args.index("--dtype") + 1] = dtype
    return ["upscale", LR_INPUT, "-o", tmp_path, *tiny_model_args(), *args]


def test_the_cli_writes_the_bf16_image_after_an_fp16_overflow_and_says_so(tmp_path, capfd, overflow, made_in_bf16):
    overflow({torch.float16})
    code, out, err = _pasd(capfd, *_cli_args(tmp_path / "fp16", "fp16"))
    assert code == 0, err
    assert "float16 overflowed (non-finite latents); this image was made in bfloat16" in err
    written = Image.open(tmp_path / "fp16" / "lr_input.png")
    assert str(tmp_path / "fp16" / "lr_input.png") in out
    record = read_record(written)
    assert record["dtype"] == "bfloat16" and record["model"]["dtype"] == "float16"
    assert torch.equal(_pixels(written), made_in_bf16)


def test_the_cli_writes_nothing_when_every_dtype_overflows(tmp_path, capfd, overflow):
    overflow({*HALF, torch.float32}, float("nan"))
    code, out, err = _pasd(capfd, *_cli_args(tmp_path, "fp16"))
    assert code == 3, err
    assert "error: the model gives non-finite values (NaN or inf) in the latents" in err
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob(".*.png*"))
