"""Weights converted at load and kept on disk (nn/converted_weights.py): a later load maps them
instead of converting, and computes the very same pixels."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import sys
import time

import numpy as np
import pytest
import torch
from conftest import COLOR_INPUT, LR_INPUT, TINY_BASE, TINY_COLOR, TINY_PASD, pasd_here, tiny_model_args
from PIL import Image
from safetensors import safe_open
from test_loading_dtype import mapped_file

from pasd_cli.engine import FAST_GUIDANCE, FAST_STEPS, UpscaleSettings, load_pipeline
from pasd_cli.nn import converted_weights
from pasd_cli.nn.converted_weights import ALIGN, PAD_PREFIX, ConvertedWeights, write_aligned

SETTINGS = UpscaleSettings(process_size=64, scale=2, seed=3, steps=2)
BF16 = torch.bfloat16
NETWORK_FILES = [TINY_PASD / part / "diffusion_pytorch_model.safetensors" for part in ("unet", "controlnet")]
on_linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")


def _image(pipeline) -> np.ndarray:
    return np.asarray(pipeline.upscale(Image.open(LR_INPUT), SETTINGS).image)


def _weights(pipeline) -> dict[str, torch.Tensor]:
    networks = {"unet": pipeline.unet, "controlnet": pipeline.controlnet}
    return {f"{part}.{k}": v for part, network in networks.items() for k, v in network.state_dict().items()}


def _copies(folder) -> list:
    return sorted(folder.glob("*.safetensors")) if folder.is_dir() else []


@on_linux
def test_a_later_load_maps_the_converted_weights_and_makes_the_same_pixels(tmp_path):
    converted = tmp_path / "converted"
    plain = load_pipeline(TINY_PASD, TINY_BASE, dtype=BF16)
    first = load_pipeline(TINY_PASD, TINY_BASE, dtype=BF16, converted=converted)
    assert len(_copies(converted)) == 2  # the UNet's and the ControlNet's
    later = load_pipeline(TINY_PASD, TINY_BASE, dtype=BF16, converted=converted)

    # Converted in memory, the first load's tensors are the allocator's; the later load's are
    # the converted files' pages.
    assert mapped_file(first.unet.conv_in.weight) == ""
    for network in (later.unet, later.controlnet):
        assert mapped_file(network.conv_in.weight) in {str(p) for p in _copies(converted)}
    assert later.unet.conv_in.weight.dtype == BF16

    expected = _weights(plain)
    for pipeline in (first, later):
        weights = _weights(pipeline)
        assert weights.keys() == expected.keys()
        assert all(torch.equal(weights[k], expected[k]) and weights[k].dtype == expected[k].dtype for k in expected)
    pixels = _image(plain)
    assert np.array_equal(_image(first), pixels)
    assert np.array_equal(_image(later), pixels)


@on_linux
def test_a_later_fast_load_reads_the_unet_with_the_lcm_lora_merged(tmp_path, lcm_file):
    lcm = tmp_path / "lcm.safetensors"
    shutil.copy(lcm_file, lcm)
    converted = tmp_path / "converted"
    plain = load_pipeline(TINY_PASD, TINY_BASE, dtype=BF16, lcm_lora=lcm)
    first = load_pipeline(TINY_PASD, TINY_BASE, dtype=BF16, lcm_lora=lcm, converted=converted)
    assert len(_copies(converted)) == 3  # the UNet, the UNet with the LoRA merged, the ControlNet
    later = load_pipeline(TINY_PASD, TINY_BASE, dtype=BF16, lcm_lora=lcm, converted=converted)
    assert first.unet.applied_merges == () and later.unet.applied_merges == ((lcm, 1.0),)
    assert mapped_file(later.unet.conv_in.weight) in {str(p) for p in _copies(converted)}
    expected = _weights(plain)
    for pipeline in (first, later):
        weights = _weights(pipeline)
        assert all(torch.equal(weights[k], expected[k]) for k in expected)
    fast = UpscaleSettings(process_size=64, scale=2, seed=3, steps=FAST_STEPS, guidance=FAST_GUIDANCE)
    pixels = [np.asarray(p.upscale(Image.open(LR_INPUT), fast).image) for p in (plain, later)]
    assert np.array_equal(*pixels)

    # Another LoRA file at the same path: merged anew, and its copy replaces the old one.
    stat = lcm.stat()
    os.utime(lcm, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    again = load_pipeline(TINY_PASD, TINY_BASE, dtype=BF16, lcm_lora=lcm, converted=converted)
    assert again.unet.applied_merges == ()
    assert len(_copies(converted)) == 3
    assert load_pipeline(TINY_PASD, TINY_BASE, dtype=BF16, lcm_lora=lcm, converted=converted).unet.applied_merges


def test_copies_written_in_the_background_are_whole_once_waited_for(tmp_path, lcm_file, monkeypatch):
    """As the command line writes them: the load goes on while its copies are written; the
    LoRA's merge waits for the UNet's plain copy, whose weights it changes in place."""
    write = converted_weights.write_aligned

    def slow_disk(*args):  # as SD size's 2.9 GB take seconds: the merge would come first
        time.sleep(0.5)
        write(*args)

    monkeypatch.setattr(converted_weights, "write_aligned", slow_disk)
    copies = ConvertedWeights(tmp_path / "converted", background=True)
    fast = load_pipeline(TINY_PASD, TINY_BASE, dtype=BF16, lcm_lora=lcm_file, converted=copies)
    copies.wait()
    assert len(copies.written) == 3 and sorted(copies.written) == _copies(copies.folder)
    plain = _weights(load_pipeline(TINY_PASD, TINY_BASE, dtype=BF16))
    unet_file = TINY_PASD / "unet" / "diffusion_pytorch_model.safetensors"
    stored = copies.read(unet_file, BF16, mapped=False)
    assert stored is not None and all(torch.equal(stored[k], plain[f"unet.{k}"]) for k in stored)
    merged = copies.read(unet_file, BF16, mapped=False, merged=((lcm_file, 1.0),))
    weights = _weights(fast)
    assert merged is not None and all(torch.equal(merged[k], weights[f"unet.{k}"]) for k in merged)


def test_every_tensor_starts_aligned_and_the_library_reads_the_file():
    state = {
        "odd": torch.arange(3, dtype=BF16),
        "empty": torch.zeros(0, dtype=torch.float32),
        "scalar": torch.tensor(2.5, dtype=torch.float32),
        "steps": torch.arange(5, dtype=torch.int64),
        "matrix": torch.randn(7, 3).to(BF16),
    }
    buffer = io.BytesIO()
    write_aligned(buffer, state, {"source": "x"})
    raw = buffer.getvalue()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    assert (8 + length) % ALIGN == 0
    for name in state:
        begin = header[name]["data_offsets"][0]
        assert begin % ALIGN == 0, name
    assert header["__metadata__"] == {"source": "x"}
    assert any(name.startswith(PAD_PREFIX) for name in header)  # the odd sizes needed padding

    path = _write(raw)
    with safe_open(str(path), "pt") as stored:
        for name, tensor in state.items():
            assert torch.equal(stored.get_tensor(name), tensor), name
    with pytest.raises(ValueError, match="reserved"):
        write_aligned(io.BytesIO(), {PAD_PREFIX + "0": torch.zeros(1)}, {})


def _write(raw: bytes):
    import tempfile

    handle = tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False)
    with handle:
        handle.write(raw)
    return handle.name


def test_a_changed_source_gets_a_new_copy_in_place_of_the_old(tmp_path):
    pasd = shutil.copytree(TINY_PASD, tmp_path / "pasd")
    converted = tmp_path / "converted"
    load_pipeline(pasd, TINY_BASE, dtype=BF16, converted=converted)
    before = _copies(converted)
    unet_file = pasd / "unet" / "diffusion_pytorch_model.safetensors"
    stat = unet_file.stat()
    os.utime(unet_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new version of the file
    load_pipeline(pasd, TINY_BASE, dtype=BF16, converted=converted)
    after = _copies(converted)
    assert len(after) == 2
    assert len(set(after) - set(before)) == 1  # the UNet's copy, made anew; the old one is gone


def test_copies_of_removed_models_and_part_written_copies_are_removed(tmp_path):
    converted = ConvertedWeights(tmp_path / "converted")
    gone, kept = tmp_path / "gone.safetensors", tmp_path / "kept.safetensors"
    for source in (gone, kept):
        source.write_bytes(b"the source's bytes")
    tensors = {"w": torch.ones(3, dtype=BF16)}
    orphan = converted.write(gone, BF16, tensors)
    assert orphan is not None and orphan.is_file()
    gone.unlink()  # its model was removed
    part = converted.folder / ".abc.safetensors.k3j9x0qz.part"  # a writer killed mid-copy
    part.write_bytes(b"half a copy")
    copy = converted.write(kept, BF16, tensors)
    assert _copies(converted.folder) == [copy]
    assert not part.exists()
    assert torch.equal(converted.read(kept, BF16, mapped=False)["w"], tensors["w"])


def test_a_damaged_copy_is_converted_again(tmp_path):
    converted = tmp_path / "converted"
    expected = _weights(load_pipeline(TINY_PASD, TINY_BASE, dtype=BF16, converted=converted))
    copies = _copies(converted)
    sizes = [p.stat().st_size for p in copies]
    with open(copies[0], "r+b") as handle:
        handle.truncate(sizes[0] // 2)
    weights = _weights(load_pipeline(TINY_PASD, TINY_BASE, dtype=BF16, converted=converted))
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    assert [p.stat().st_size for p in _copies(converted)] == sizes  # written whole again


def test_loads_go_on_where_no_copy_can_be_written(tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the folder would be")
    expected = _weights(load_pipeline(TINY_PASD, TINY_BASE, dtype=BF16))
    weights = _weights(load_pipeline(TINY_PASD, TINY_BASE, dtype=BF16, converted=blocked / "converted"))
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    assert not any(p.name.endswith(".part") for p in tmp_path.rglob("*"))


def test_no_copy_takes_the_space_a_run_needs(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    converted = ConvertedWeights(tmp_path / "converted", keep_free=free)  # copies would eat into it
    expected = _weights(load_pipeline(TINY_PASD, TINY_BASE, dtype=BF16))
    weights = _weights(load_pipeline(TINY_PASD, TINY_BASE, dtype=BF16, converted=converted))
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    assert _copies(converted.folder) == [] and converted.written == []


def test_float32_and_unconverted_loads_keep_no_copy(tmp_path):
    converted = tmp_path / "converted"
    load_pipeline(TINY_PASD, TINY_BASE, dtype=torch.float32, converted=converted)
    assert not converted.exists()  # float32 files read into float32: nothing to convert
    ConvertedWeights(converted).write(NETWORK_FILES[0], BF16, {"x": torch.zeros(2, dtype=BF16)})
    assert len(_copies(converted)) == 1


@on_linux
@pytest.mark.parametrize("command", ["upscale", "colorize"])
def test_the_command_line_keeps_converted_weights_in_the_model_store(command, tmp_path):
    store = tmp_path / "store"
    if command == "upscale":
        args = ["upscale", LR_INPUT, *tiny_model_args(), "--process-size", "64"]
    else:
        args = ["colorize", COLOR_INPUT, "--pasd", TINY_COLOR, "--base", TINY_BASE, "--process-size", "64"]
    common = ["--steps", "1", "--device", "cpu", "--dtype", "bf16", "--caption", "none", "--models-dir", store]
    runs = [pasd_here(*args, *common, "-o", tmp_path / f"out{i}", "-v") for i in range(2)]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr
    copies = _copies(store / ".converted")
    assert len(copies) == 2
    assert "kept the weights converted to bfloat16" in runs[0].stderr
    assert "kept the weights converted" not in runs[1].stderr
    outputs = [sorted((tmp_path / f"out{i}").iterdir()) for i in range(2)]
    assert [p.name for p in outputs[0]] == [p.name for p in outputs[1]]
    for a, b in zip(*outputs):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
