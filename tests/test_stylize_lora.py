"""LoRA merging (spec section 6): kohya files, alpha / rank honoured, linear and conv layers, stock
layers only; weight 0 reproduces the plain output bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_LIGHT
from safetensors.torch import save_file
from tiny_bases import fresh_components, kohya_name, lora_pair, paca_from_file, plain_render, render, write_kohya_lora

from pasd_cli.cli.app import hint_for
from pasd_cli.engine.lora import apply_lora
from pasd_cli.errors import ModelError

RANK = 4
# (module, kind): one of each layer shape a kohya LoRA / LoCon touches in SD 1.5.
UNET_LAYERS = {
    "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": "linear",  # beside light PACA
    "down_blocks.0.attentions.0.proj_in": "conv 1x1",
    "down_blocks.0.resnets.0.conv1": "conv 3x3",
    "mid_block.resnets.0.time_emb_proj": "linear",
}
TEXT_LAYERS = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc2"]


def _text_module(text_encoder, name):
    try:
        return text_encoder.get_submodule(name)
    except AttributeError:
        return text_encoder.get_submodule("text_model." + name)


def _lora_for(components, alpha, seed=0):
    """{kohya name: (down, up, alpha)} and {(part, module): (down, up)} for the manual merge."""
    layers, manual = {}, {}
    for i, name in enumerate(UNET_LAYERS):
        down, up = lora_pair(components.unet.get_submodule(name).weight, RANK, seed + i)
        layers[kohya_name(name)] = (down, up, alpha)
        manual[("unet", name)] = (down, up)
    for i, name in enumerate(TEXT_LAYERS):
        down, up = lora_pair(_text_module(components.text_encoder, name).weight, RANK, seed + 100 + i)
        layers[kohya_name(name, text_encoder=True)] = (down, up, alpha)
        manual[("text_encoder", name)] = (down, up)
    return layers, manual


def _manual_delta(down, up):
    # Written differently from the engine's flatten-matmul: an explicit contraction over rank.
    if down.dim() == 2:
        return up @ down
    return torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)


def _weights(components):
    return (
        {k: v.clone() for k, v in components.unet.state_dict().items()},
        {k: v.clone() for k, v in components.text_encoder.state_dict().items()},
    )


def _check_merge(components, before, manual, factor):
    unet_before, text_before = before
    unet_after, text_after = _weights(components)
    touched_unet = {f"{name}.weight" for part, name in manual if part == "unet"}
    touched_text = set()
    for (part, name), (down, up) in manual.items():
        if part == "unet":
            key, old, new = f"{name}.weight", unet_before, unet_after
        else:
            key = f"{name}.weight" if f"{name}.weight" in text_after else f"text_model.{name}.weight"
            touched_text.add(key)
            old, new = text_before, text_after
        expected = old[key] + factor * _manual_delta(down, up)
        assert torch.allclose(new[key], expected, atol=1e-6, rtol=0), key
        assert not torch.equal(new[key], old[key]), key
    for key in unet_before:
        if key not in touched_unet:
            assert torch.equal(unet_after[key], unet_before[key]), key
    for key in text_before:
        if key not in touched_text:
            assert torch.equal(text_after[key], text_before[key]), key


def test_weight_1_with_alpha_half_the_rank_adds_half_of_up_down(tmp_path):
    components = fresh_components()
    layers, manual = _lora_for(components, alpha=RANK / 2)
    path = write_kohya_lora(tmp_path / "style.safetensors", layers)
    before = _weights(components)
    report = apply_lora(components, path, weight=1.0)
    assert (report.unet_layers, report.text_encoder_layers) == (len(UNET_LAYERS), len(TEXT_LAYERS))
    _check_merge(components, before, manual, factor=0.5)
    for key, value in paca_from_file(TINY_LIGHT).items():
        assert torch.equal(components.unet.state_dict()[key], value), key


def test_weight_multiplies_and_missing_alpha_means_scale_1(tmp_path):
    components = fresh_components()
    layers, manual = _lora_for(components, alpha=None, seed=5)
    path = write_kohya_lora(tmp_path / "style.safetensors", layers)
    before = _weights(components)
    apply_lora(components, path, weight=0.7)
    _check_merge(components, before, manual, factor=0.7)


def test_weight_0_reproduces_plain_output_exactly(tmp_path):
    components = fresh_components()
    layers, _ = _lora_for(components, alpha=RANK / 2)
    path = write_kohya_lora(tmp_path / "style.safetensors", layers)
    apply_lora(components, path, weight=0.0)
    assert np.array_equal(render(components), plain_render())
    apply_lora(components, path, weight=1.0)
    assert not np.array_equal(render(components), plain_render())


def test_kohya_names_in_the_original_ldm_block_layout_merge_the_same(tmp_path):
    """LoRAs extracted from LDM checkpoints name UNet blocks input_blocks / output_blocks;
    diffusers' converter maps them to the same layers."""
    ldm_names = {
        "down_blocks.0.attentions.0.proj_in": "lora_unet_input_blocks_1_1_proj_in",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": (
            "lora_unet_output_blocks_3_1_transformer_blocks_0_attn2_to_k"
        ),
        "down_blocks.0.resnets.0.conv1": "lora_unet_input_blocks_1_0_in_layers_2",
    }
    merged = []
    for naming in ("diffusers", "ldm"):
        components = fresh_components()
        layers = {}
        for i, (module, ldm) in enumerate(ldm_names.items()):
            down, up = lora_pair(components.unet.get_submodule(module).weight, RANK, i)
            layers[kohya_name(module) if naming == "diffusers" else ldm] = (down, up, 1.0)
        apply_lora(components, write_kohya_lora(tmp_path / f"{naming}.safetensors", layers))
        merged.append({m: components.unet.get_submodule(m).weight.clone() for m in ldm_names})
    for module in ldm_names:
        assert torch.equal(merged[0][module], merged[1][module]), module


def test_peft_layout_lora_merges_like_kohya(tmp_path):
    components_kohya, components_peft = fresh_components(), fresh_components()
    module = "down_blocks.1.attentions.1.transformer_blocks.0.ff.net.2"
    down, up = lora_pair(components_kohya.unet.get_submodule(module).weight, RANK, 3)
    apply_lora(components_kohya, write_kohya_lora(tmp_path / "k.safetensors", {kohya_name(module): (down, up, None)}))
    save_file(
        {f"unet.{module}.lora_A.weight": down, f"unet.{module}.lora_B.weight": up}, str(tmp_path / "p.safetensors")
    )
    apply_lora(components_peft, tmp_path / "p.safetensors")
    assert torch.equal(
        components_kohya.unet.get_submodule(module).weight, components_peft.unet.get_submodule(module).weight
    )


def test_several_loras_accumulate(tmp_path):
    components = fresh_components()
    module = "down_blocks.0.attentions.0.proj_in"
    weight_before = components.unet.get_submodule(module).weight.clone()
    deltas = []
    for i, (alpha, strength) in enumerate([(2.0, 1.0), (4.0, -0.5)]):
        down, up = lora_pair(weight_before, RANK, 20 + i)
        apply_lora(
            components,
            write_kohya_lora(tmp_path / f"{i}.safetensors", {kohya_name(module): (down, up, alpha)}),
            weight=strength,
        )
        deltas.append(strength * alpha / RANK * _manual_delta(down, up))
    assert torch.allclose(components.unet.get_submodule(module).weight, weight_before + sum(deltas), atol=1e-6, rtol=0)


# --- refusals -----------------------------------------------------------------------------------


def test_layer_that_matches_nothing_is_refused_by_name_and_nothing_changes(tmp_path):
    components = fresh_components()
    good = "down_blocks.0.attentions.0.proj_in"
    down, up = lora_pair(components.unet.get_submodule(good).weight, RANK, 0)
    layers = {kohya_name(good): (down, up, 1.0), "lora_unet_down_blocks_0_attentions_0_no_such_layer": (down, up, 1.0)}
    before = components.unet.get_submodule(good).weight.clone()
    with pytest.raises(ModelError, match="no.such.layer") as failure:
        apply_lora(components, write_kohya_lora(tmp_path / "bad.safetensors", layers))
    assert failure.value.exit_code == 3
    assert torch.equal(components.unet.get_submodule(good).weight, before)


def test_paca_layers_cannot_be_targeted(tmp_path):
    """A PEFT-layout file can name a PACA layer exactly; only the stock-layer rule refuses it."""
    components = fresh_components()
    paca = "up_blocks.1.attentions.0.transformer_blocks.0.attn2_plus.to_q"
    down, up = lora_pair(components.unet.get_submodule(paca).weight, RANK, 0)
    save_file({f"unet.{paca}.lora_A.weight": down, f"unet.{paca}.lora_B.weight": up}, str(tmp_path / "p.safetensors"))
    with pytest.raises(ModelError, match="attn2_plus"):
        apply_lora(components, tmp_path / "p.safetensors")
    for key, value in paca_from_file(TINY_LIGHT).items():
        assert torch.equal(components.unet.state_dict()[key], value), key


@pytest.mark.parametrize("extra,name", [(".dora_scale", "DoRA"), (".hada_w1_a", "LoHa")])
def test_other_network_kinds_are_refused(tmp_path, extra, name):
    path = tmp_path / "net.safetensors"
    save_file(
        {
            "lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3),
            "lora_unet_conv_in.lora_up.weight": torch.zeros(16, 2, 1, 1),
            "lora_unet_conv_in" + extra: torch.zeros(2),
        },
        str(path),
    )
    with pytest.raises(ModelError, match=name):
        apply_lora(fresh_components(), path)


def test_full_checkpoint_given_as_lora_is_refused_with_a_hint(tmp_path):
    from tiny_bases import write_checkpoint

    components = fresh_components()
    path = write_checkpoint(tmp_path / "model.safetensors", components)
    with pytest.raises(ModelError, match="not a LoRA") as failure:
        apply_lora(components, path)
    assert "--style" in hint_for(failure.value)  # the command line names its option; the engine does not


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_merge_sum_in_slices_is_the_float32_sum_bit_for_bit(dtype):
    """The merge adds the weight to the scaled product in slices, in place (lora.MERGE_SLICE):
    the very bits of widening the weight and adding the scaled product to it, across slice
    borders too."""
    from pasd_cli.engine.lora import MERGE_SLICE, _add_scaled_in_place

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(2 * MERGE_SLICE + 17, generator=generator).to(dtype).reshape(-1, 1, 1)
    delta = torch.randn(weight.shape, generator=generator) * 1e-3
    expected = weight.float() + 0.37 * delta
    _add_scaled_in_place(delta, 0.37, weight)
    assert torch.equal(delta, expected)
