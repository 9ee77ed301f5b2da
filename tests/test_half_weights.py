"""Half-precision weights computed in float32 (engine/half_weights.py): weights that the files
store in float16 stay so and are widened per layer as it runs. The output is the float32 load's,
pixel for pixel, at half the weights' memory."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import LR_INPUT, TINY_BASE, TINY_LIGHT, TINY_PASD
from PIL import Image
from safetensors.torch import load_file, save_file
from test_loading_dtype import mapped_file
from tiny_bases import kohya_name, lora_pair, perturbed, stock_state, write_checkpoint, write_kohya_lora

from pasd_cli.engine import LoraSpec, StylizeSettings, UpscaleSettings, load_pipeline, load_stylize_pipeline
from pasd_cli.engine.half_weights import stored_bytes, widen_per_layer
from pasd_cli.engine.loading import load_components
from pasd_cli.nn.tensor_file import float_dtypes, read_tensors

SETTINGS = UpscaleSettings(process_size=64, scale=2, seed=3, steps=2)
LORA_LAYERS = ["down_blocks.0.attentions.0.proj_in", "up_blocks.3.resnets.2.conv2"]


def _halve_folder(source, target):
    """A copy of a model folder with every safetensors file in float16, as released files are."""
    shutil.copytree(source, target)
    for path in target.rglob("*.safetensors"):
        state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(path).items()}
        save_file(state, str(path), metadata={"format": "pt"})
    return target


@pytest.fixture(scope="module")
def half_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("half")
    return _halve_folder(TINY_PASD, root / "pasd"), _halve_folder(TINY_BASE, root / "base")


def _image(pipeline) -> np.ndarray:
    return np.asarray(pipeline.upscale(Image.open(LR_INPUT), SETTINGS).image)


def _networks(pipeline):
    return (pipeline.unet, pipeline.controlnet, pipeline.text_encoder, pipeline.vae.vae)


def test_kept_half_weights_give_the_float32_loads_pixels_at_half_the_memory(half_models):
    pasd, base = half_models
    full = load_pipeline(pasd, base)
    half = load_pipeline(pasd, base, keep_half_weights=True)
    assert np.array_equal(_image(half), _image(full))
    for kept, widened in zip(_networks(half), _networks(full)):
        # Norms and biases of norms are float32 in both; they are a sliver of the weights.
        assert 0.5 * stored_bytes(widened) <= stored_bytes(kept) <= 0.52 * stored_bytes(widened)
    # The networks say the dtype they compute in, which is what the pipeline feeds them.
    assert half.unet.dtype == half.controlnet.dtype == half.vae.vae.dtype == torch.float32
    assert half.unet.conv_in.weight.dtype == torch.float16
    assert half.half_weights and not full.half_weights


def test_float32_files_are_computed_as_before(half_models):
    """Nothing to keep: the float32 reference files give float32 weights, and the same pixels."""
    kept = load_pipeline(TINY_PASD, TINY_BASE, keep_half_weights=True)
    assert all(p.dtype == torch.float32 for model in _networks(kept) for p in model.parameters())
    assert not kept.half_weights
    assert np.array_equal(_image(kept), _image(load_pipeline(TINY_PASD, TINY_BASE)))


def test_a_lora_merged_into_kept_half_weights_stays_float32(half_models, tmp_path):
    pasd, base = half_models
    unet = load_components(pasd, base).unet
    layers = {}
    for i, name in enumerate(LORA_LAYERS):
        down, up = lora_pair(unet.get_submodule(name).weight, 4, 40 + i)
        layers[kohya_name(name)] = (0.2 * down, up, 2.0)
    lora = write_kohya_lora(tmp_path / "pytorch_lora_weights.safetensors", layers)
    full = load_pipeline(pasd, base, lcm_lora=lora)
    half = load_pipeline(pasd, base, lcm_lora=lora, keep_half_weights=True)
    for name in LORA_LAYERS:
        merged = half.unet.get_submodule(name).weight
        assert merged.dtype == torch.float32
        assert torch.equal(merged, full.unet.get_submodule(name).weight)
    if sys.platform.startswith("linux"):
        # No merge goes into the ControlNet: its weights stay the file's pages, not a read.
        assert mapped_file(half.controlnet.conv_in.weight).endswith("diffusion_pytorch_model.safetensors")
        assert mapped_file(half.unet.conv_in.weight) == ""  # read: merges replace its weights
    fast = UpscaleSettings(process_size=64, scale=2, seed=3, steps=2, guidance=1.0)
    run = [np.asarray(p.upscale(Image.open(LR_INPUT), fast).image) for p in (half, full)]
    assert np.array_equal(*run)


def test_half_compute_keeps_nothing_to_widen():
    layer = torch.nn.Linear(3, 3).half()
    assert widen_per_layer(torch.nn.Sequential(layer), torch.bfloat16) == 0
    assert layer.weight.dtype == torch.bfloat16


def test_mixed_layers_are_widened_for_good():
    """A layer with one float32 tensor (a merged weight beside its half bias) is cast whole."""
    mixed, half = torch.nn.Linear(3, 3).half(), torch.nn.Conv2d(2, 2, 1).half()
    mixed.weight.data = mixed.weight.data.float()
    assert widen_per_layer(torch.nn.Sequential(mixed, torch.nn.GroupNorm(1, 2).half(), half), torch.float32) == 1
    assert mixed.bias.dtype == torch.float32 and half.weight.dtype == torch.float16


def test_reading_keeps_the_listed_dtypes_as_stored(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(
        {"a": torch.ones(2, dtype=torch.float16), "b": torch.ones(2), "c": torch.ones(2, dtype=torch.int64)}, path
    )
    assert float_dtypes(path) == {torch.float16, torch.float32}
    state = read_tensors(path, torch.float32, keep={torch.float16})
    assert [state[k].dtype for k in "abc"] == [torch.float16, torch.float32, torch.int64]
    assert read_tensors(path, torch.float32)["a"].dtype == torch.float32


def test_a_forward_that_raised_leaves_the_layer_its_own_weights():
    """An error inside a layer (out of memory, then a retry) skips the hook's post-forward; the
    next forward must still compute with the layer's own weights, not with what the next layers
    left in the shared buffer."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)).half()
    reference = [(layer.weight.float().clone(), layer.bias.float().clone()) for layer in model]
    widen_per_layer(model, torch.float32)
    with torch.no_grad():
        with pytest.raises(RuntimeError):
            model(torch.ones(1, 5))  # fails inside the first layer, after its weights were widened
        model(torch.ones(3, 4))  # the second layer widens into the same buffer
        expected = torch.ones(1, 4)
        for weight, bias in reference:
            expected = torch.nn.functional.linear(expected, weight, bias)
        assert torch.equal(model(torch.ones(1, 4)), expected)
    assert {layer.weight.dtype for layer in model} == {torch.float16}


def test_the_command_line_keeps_half_weights_in_float32_except_in_exact_mode():
    from pasd_cli.cli.runtime import pick_runtime

    assert pick_runtime("cpu", "fp32").half_weights
    assert not pick_runtime("cpu", "fp32", exact=True).half_weights
    assert not pick_runtime("cpu", "fp32", compile=True).half_weights
    assert not pick_runtime("cpu", "bf16").half_weights


@pytest.fixture(scope="module")
def half_light(tmp_path_factory):
    root = tmp_path_factory.mktemp("half-light")
    return _halve_folder(TINY_LIGHT, root / "pasd"), _halve_folder(TINY_BASE, root / "base")


def test_stylize_keeps_what_no_merge_changes_and_merges_in_float32(half_light, tmp_path):
    """A base blended and a LoRA merged into fp16 weights kept for fp32 compute: the merged tensors
    become fp32 (never rounded to the file's fp16), the rest stays fp16, and the image is the fp32
    load's, pixel for pixel."""
    pasd, base = half_light
    components = load_components(pasd, base)
    style = write_checkpoint(
        tmp_path / "style.safetensors",
        components,
        unet_state=perturbed(stock_state(components), seed=1),
        text_state=perturbed(components.text_encoder.state_dict(), seed=2),
    )
    down, up = lora_pair(components.unet.get_submodule(LORA_LAYERS[0]).weight, 4, 40)
    lora = write_kohya_lora(tmp_path / "lora.safetensors", {kohya_name(LORA_LAYERS[0]): (0.2 * down, up, 2.0)})
    options = {"blend": 0.5, "loras": [LoraSpec(str(lora), 0.8)]}
    full, _ = load_stylize_pipeline(pasd, base, style, **options)
    half, _ = load_stylize_pipeline(pasd, base, style, keep_half_weights=True, **options)
    assert half.half_weights
    assert half.unet.conv_in.weight.dtype == torch.float32  # blended
    assert half.controlnet.conv_in.weight.dtype == torch.float16  # no merge touches it
    stock = set(stock_state(components))
    paca = {p.dtype for name, p in half.unet.named_parameters() if name not in stock and ".to_" in name}
    assert paca == {torch.float16}  # the blend leaves PACA's attention alone
    # The checkpoint's VAE and text encoder replace the fp16 ones, in fp32 as read.
    assert {p.dtype for model in (half.text_encoder, half.vae.vae) for p in model.parameters()} == {torch.float32}
    settings = StylizeSettings(process_size=64, seed=3, steps=2)
    images = [np.asarray(p.upscale(Image.open(LR_INPUT), settings).image) for p in (half, full)]
    assert np.array_equal(*images)
