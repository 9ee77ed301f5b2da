"""The automatic tile batch (engine.tile_batch): on CUDA as many latent tiles a pass as the
memory budget holds, elsewhere one; and a batch that runs out of memory goes one tile a pass
before any tile is made smaller (the same tiles, so the same result)."""

from __future__ import annotations

import torch
from conftest import LR_INPUT
from PIL import Image

from pasd_cli.engine import UpscaleSettings
from pasd_cli.engine.pipeline import image_to_tensor
from pasd_cli.engine.settings import exact_settings
from pasd_cli.engine.tile_batch import MAX_AUTO_TILE_BATCH, auto_tile_batch, pass_bytes

GB = 2**30
TILE = 64 * 64  # latent pixels of a training-size tile


def test_one_tile_a_pass_off_cuda_or_without_a_budget():
    for device in ("cpu", "mps"):
        assert auto_tile_batch(device, 16, TILE, 2, 4, 100 * GB) == 1
    assert auto_tile_batch("cuda", 16, TILE, 2, 2, None) == 1
    assert auto_tile_batch("cuda", 1, TILE, 2, 2, 100 * GB) == 1


def test_cuda_batches_what_the_budget_holds_spread_evenly():
    one = pass_bytes(TILE, 2, 2)  # a tile's CFG pair in float16
    assert auto_tile_batch("cuda", 16, TILE, 2, 2, 3 * one) == 3  # 16 tiles: passes of 3
    assert auto_tile_batch("cuda", 16, TILE, 2, 2, one - 1) == 1  # not even one fits: one anyway
    assert auto_tile_batch("cuda", 16, TILE, 2, 2, 100 * GB) == MAX_AUTO_TILE_BATCH
    # 9 tiles with room for 8: two passes either way, so 5 + 4 rather than 8 + 1.
    assert auto_tile_batch("cuda", 9, TILE, 2, 2, 100 * GB) == 5
    assert auto_tile_batch("cuda", 3, TILE, 2, 2, 100 * GB) == 3  # never more than the step has
    # Without CFG a tile is one sample: twice as many fit.
    assert auto_tile_batch("cuda", 16, TILE, 1, 2, 4 * one) == 8


def test_the_estimate_grows_with_tile_area_samples_and_dtype():
    assert pass_bytes(2 * TILE, 2, 2) == pass_bytes(TILE, 4, 2) == pass_bytes(TILE, 2, 4) == 2 * pass_bytes(TILE, 2, 2)
    # A 64-latent CFG pair in float32: 0.33 GB measured on the CPU, plus the margin.
    assert 0.33e9 < pass_bytes(TILE, 2, 4) < 0.6e9


SETTINGS = UpscaleSettings(steps=1, guidance=1.0, scale=4, process_size=112, latent_tile=16, latent_overlap=4)


def test_automatic_is_one_tile_a_pass_on_the_cpu_and_in_exact_mode(tiny_pipeline):
    assert SETTINGS.tile_batch is None and exact_settings(SETTINGS).tile_batch == 1
    budget = tiny_pipeline.memory_budget
    tiny_pipeline.memory_budget = 100 * GB
    try:
        assert tiny_pipeline.tile_batch(SETTINGS, 30, 50, 16, 4) == 1
        result = tiny_pipeline.upscale(Image.open(LR_INPUT), SETTINGS)
    finally:
        tiny_pipeline.memory_budget = budget
    assert (result.latent_tiles, result.tile_batch) == (12, 1)


def test_a_batch_out_of_memory_runs_one_tile_a_pass(tiny_pipeline):
    """Passes of more than 2 samples do not fit: the batch of 4 tiles falls back to one a pass,
    with the same 12 tiles (not halved), one warning, and the result of one a pass."""
    settings = UpscaleSettings(**{**SETTINGS.__dict__, "tile_batch": 4})
    expected = tiny_pipeline.upscale(Image.open(LR_INPUT), UpscaleSettings(**{**SETTINGS.__dict__, "tile_batch": 1}))
    refused = []

    def ceiling(module, args):
        if args[0].shape[0] > 2:
            refused.append(args[0].shape[0])
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    hook = tiny_pipeline.unet.register_forward_pre_hook(ceiling)
    warnings: list[str] = []
    try:
        result = tiny_pipeline.upscale(Image.open(LR_INPUT), settings, on_warning=warnings.append)
    finally:
        hook.remove()
    assert refused == [4]
    assert warnings == ["out of memory on cpu; retrying with one latent tile a pass"]
    assert (result.latent_tiles, result.tile_batch) == (12, 1)
    diff = (image_to_tensor(result.image).int() - image_to_tensor(expected.image).int()).abs()
    assert diff.max() <= 1


def test_batched_tiles_are_recorded(tiny_pipeline):
    result = tiny_pipeline.upscale(Image.open(LR_INPUT), UpscaleSettings(**{**SETTINGS.__dict__, "tile_batch": 5}))
    assert (result.latent_tiles, result.tile_batch) == (12, 5)


def test_the_command_line_records_the_batch_and_refuses_a_bad_one(tmp_path, capsys):
    import json

    from conftest import tiny_model_args
    from hardening import pasd_in_process

    args = [*tiny_model_args(), "--device", "cpu", "--dtype", "fp32", "--caption", "none", "--json"]
    args += [
        "--scale",
        "4",
        "--steps",
        "1",
        "--guidance",
        "1",
        "--process-size",
        "112",
        "--latent-tile",
        "16",
        "--latent-overlap",
        "4",
    ]
    for given, batch in (("auto", 1), ("3", 3)):
        done = pasd_in_process(capsys, "upscale", LR_INPUT, "-o", tmp_path / given, *args, "--tile-batch", given)
        assert done.code == 0, done.stderr
        record = json.loads(done.stdout.splitlines()[0])
        assert (record["latent_tiles"], record["tile_batch"]) == (12, batch)
    for bad in ("0", "many"):
        refused = pasd_in_process(capsys, "upscale", LR_INPUT, "-o", tmp_path / bad, *args, "--tile-batch", bad)
        assert refused.code == 2 and "tile" in refused.one_error(), refused.stderr
