"""Out of memory: the pipeline halves the latent or VAE tile and runs the stage again, with one
warning. A device that cannot hold large activations is stood in for by hooks that raise
torch.OutOfMemoryError above a size, exactly as CUDA's allocator would."""

from __future__ import annotations

import pytest
import torch
from conftest import LR_INPUT
from PIL import Image

from pasd_cli.engine import UpscaleSettings
from pasd_cli.engine.memory import TileShrinker, is_out_of_memory
from pasd_cli.engine.pipeline import image_to_tensor
from pasd_cli.engine.tiling import TileGrid
from pasd_cli.errors import DeviceError

SETTINGS = UpscaleSettings(
    steps=1, guidance=1.0, scale=4, process_size=112, latent_tile=64, latent_overlap=4, vae_tile=0
)


class _Ceiling:
    """A forward pre-hook: inputs of more than `pixels` spatial elements do not fit."""

    def __init__(self, pixels: int):
        self.pixels = pixels
        self.refused = 0

    def __call__(self, module, args):
        if args[0].shape[-2] * args[0].shape[-1] > self.pixels:
            self.refused += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.fixture
def ceilings(tiny_pipeline):
    hooks = []

    def limit(module, pixels):
        ceiling = _Ceiling(pixels)
        hooks.append(module.register_forward_pre_hook(ceiling))
        return ceiling

    yield limit
    for hook in hooks:
        hook.remove()


def test_out_of_memory_halves_tiles_and_warns_once(tiny_pipeline, ceilings):
    lr = Image.open(LR_INPUT)  # 400x240 hint, latent 50x30: untiled by default
    expected = tiny_pipeline.upscale(lr, UpscaleSettings(**{**SETTINGS.__dict__, "latent_tile": 25, "vae_tile": 200}))
    unet_ceiling = ceilings(tiny_pipeline.unet.conv_in, 26 * 26)  # the whole 50x30 latent fails
    # The whole image fails; 200-px tiles with their halo (at most 272x192) fit.
    vae_ceiling = ceilings(tiny_pipeline.vae.vae.decoder.conv_out, 240 * 240)
    warnings = []
    result = tiny_pipeline.upscale(lr, SETTINGS, on_warning=warnings.append)
    assert unet_ceiling.refused >= 1 and vae_ceiling.refused >= 1
    assert len(warnings) == 1 and "out of memory" in warnings[0], warnings
    # Latent 50 -> 25 (the tiles asked for directly above); VAE 400 -> 200 px.
    assert result.latent_tiles == expected.latent_tiles > 1 and result.vae_tile == 200
    diff = (image_to_tensor(result.image).int() - image_to_tensor(expected.image).int()).abs()
    assert diff.max() <= 1


def test_halved_latent_tiles_keep_a_bounded_overlap(tiny_pipeline, ceilings):
    """A large requested overlap must not survive the halving as is: clamped to the halved tile it
    leaves a stride of one latent pixel (here 341 tiles a step instead of 8)."""
    lr = Image.open(LR_INPUT)  # latent 50x30: untiled with tile 40 (1500 <= 1600 latent pixels)
    settings = UpscaleSettings(**{**SETTINGS.__dict__, "latent_tile": 40, "latent_overlap": 30})
    ceilings(tiny_pipeline.unet.conv_in, 26 * 26)  # 40 -> 20
    tiles = []
    result = tiny_pipeline.upscale(
        lr, settings, progress=lambda stage, done, total: tiles.append(total) if stage == "tile" else None
    )
    assert result.latent_tiles == len(TileGrid.build(30, 50, 20, 10).tiles) == 8
    assert set(tiles) == {8}


def test_out_of_memory_at_the_smallest_tile_is_a_device_error():
    shrinker = TileShrinker(torch.device("cpu"))
    calls = []

    def stage(tile):
        calls.append(tile)
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(DeviceError, match="out of memory") as info:
        shrinker.run(stage, 0, 1000, 64, "VAE")
    assert info.value.exit_code == 4
    assert calls == [0, 500, 250, 125]


def test_other_errors_are_not_retried():
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert is_out_of_memory(RuntimeError("Invalid buffer size: 19.45 GB"))  # MPS: above Metal's largest buffer
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape"):
        TileShrinker(torch.device("cpu")).run(
            lambda tile: (_ for _ in ()).throw(RuntimeError("shape")), 0, 100, 8, "VAE"
        )


# Messages as torch raises them for tensors too large for a kernel rather than for memory.
TOO_LARGE = [
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a non-contiguous input.",
    "cuDNN error: CUDNN_STATUS_INTERNAL_ERROR",
    "GET was unable to find an engine to execute this computation",
    "input tensor must fit into 32-bit index math",
    "Expected canUse32BitIndexMath(input) && canUse32BitIndexMath(output) to be true, but got false.",
    "numel needs to be smaller than int32_t max; otherwise, please use packed_accessor64",
    "upsample_nearest_nhwc only supports output tensors with less than INT_MAX elements",
    "Output size of the matrix multiplication is larger than currently supported by the MPS backend: "
    "72250,72250, needs to be less than 2**32 elements",
    "MPSGaph does not support tensor dims larger than INT_MAX",
]


@pytest.mark.parametrize("message", TOO_LARGE)
def test_errors_of_tensors_too_large_are_retried_with_smaller_tiles(message):
    assert is_out_of_memory(RuntimeError(message))
    calls = []

    def stage(tile):
        calls.append(tile)
        if tile == 0 or tile > 300:
            raise RuntimeError(message)
        return tile

    warnings = []
    assert TileShrinker(torch.device("cpu"), warnings.append).run(stage, 0, 1000, 64, "VAE") == (250, 250)
    assert calls == [0, 500, 250] and len(warnings) == 1


def test_errors_that_a_smaller_tile_does_not_cure_are_not_retried():
    for message in ("CUDA error: an illegal memory access was encountered", "expected scalar type Half but got Float"):
        assert not is_out_of_memory(RuntimeError(message))
    assert not is_out_of_memory(ValueError("out of memory"))  # not a device error


def test_an_upscale_that_runs_out_of_memory_fails_with_the_image_named():
    from pathlib import Path

    from PIL import Image

    from pasd_cli.batch.plan import Job
    from pasd_cli.cli.diffusion import upscale_image
    from pasd_cli.engine import UpscaleSettings

    class Failing:
        device = torch.device("mps")
        dtype = torch.float16

        def __init__(self, error):
            self.error = error

        def upscale(self, *args, **kwargs):
            raise self.error

    job = Job(source=Path("photos/cat.png"), rel=Path("cat.png"), found=True)
    rgb = Image.new("RGB", (8, 8))
    for error in (torch.OutOfMemoryError("CUDA out of memory"), RuntimeError("MPS backend out of memory")):
        with pytest.raises(DeviceError, match=r"out of memory on mps upscaling photos/cat\.png") as info:
            upscale_image(Failing(error), rgb, UpscaleSettings(), job)
        assert info.value.exit_code == 4
    with pytest.raises(RuntimeError, match="shape"):
        upscale_image(Failing(RuntimeError("shape mismatch")), rgb, UpscaleSettings(), job)
