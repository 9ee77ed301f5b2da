"""Personalized bases (spec section 6): single-file LDM checkpoints converted offline, UNet-only and
diffusers folders; PACA always stays PASD's; blend 0 reproduces the plain output bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_LIGHT, TINY_PASD
from ldm_layout import checkpoint_from_parts
from tiny_bases import (
    fresh_components,
    paca_from_file,
    perturbed,
    plain_render,
    render,
    stock_state,
    write_checkpoint,
    write_diffusers_folder,
    write_unet_folder,
)

from pasd_cli.cli.app import hint_for
from pasd_cli.engine.bases import DIFFUSERS_FOLDER, SINGLE_FILE, UNET_FOLDER, apply_base, base_kind, stock_unet_keys
from pasd_cli.engine.single_file import sd15_config
from pasd_cli.errors import ModelError


def _assert_paca_is_pasds(components, pasd) -> None:
    state = components.unet.state_dict()
    for key, value in paca_from_file(pasd).items():
        assert torch.equal(state[key], value), key


def _assert_state(module_state: dict, expected: dict) -> None:
    assert set(module_state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(module_state[key], value), key


# --- the test-side LDM writer and the shipped configs -------------------------------------------


def test_ldm_writer_round_trips_through_diffusers_converters():
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        infer_diffusers_model_type,
    )

    components = fresh_components()
    unet = stock_state(components)
    checkpoint = checkpoint_from_parts(unet, components.unet.config, components.vae, components.text_encoder)
    assert infer_diffusers_model_type(checkpoint) == "v1"
    _assert_state(convert_ldm_unet_checkpoint(checkpoint, dict(components.unet.config)), unet)
    _assert_state(convert_ldm_vae_checkpoint(checkpoint, components.vae.config), components.vae.state_dict())
    text = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(checkpoint).items()}
    _assert_state(text, {k.removeprefix("text_model."): v for k, v in components.text_encoder.state_dict().items()})


def test_shipped_sd15_configs_build_sd15_and_match_the_ldm_layout():
    """At full size (meta device): the known SD 1.5 parameter counts, and the LDM key set that
    diffusers' converters map back exactly, so a real civitai file converts with these configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(sd15_config("unet"))
        vae = AutoencoderKL.from_config(sd15_config("vae"))
        text = CLIPTextModel(CLIPTextConfig.from_dict(sd15_config("text_encoder")))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(unet), count(vae), count(text)) == (859_520_964, 83_653_863, 123_060_480)
    checkpoint = checkpoint_from_parts(unet.state_dict(), unet.config, vae, text)
    # Keys every SD 1.5 checkpoint has, and diffusers' own v1 marker.
    for key in (
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
    ):
        assert key in checkpoint, key
    assert set(convert_ldm_unet_checkpoint(checkpoint, sd15_config("unet"))) == set(unet.state_dict())
    assert set(convert_ldm_vae_checkpoint(checkpoint, sd15_config("vae"))) == set(vae.state_dict())


# --- single-file checkpoints ----------------------------------------------------------------------


def test_blend_0_with_same_vae_and_text_encoder_reproduces_plain_output_exactly(tmp_path):
    plain = plain_render()
    components = fresh_components()
    other_unet = perturbed(stock_state(components), seed=1)
    path = write_checkpoint(tmp_path / "style.safetensors", components, unet_state=other_unet)
    report = apply_base(components, path, blend=0.0)
    assert report.kind == SINGLE_FILE and set(report.replaced) == {"vae", "text_encoder"}
    assert report.unet_tensors == len(other_unet)
    assert np.array_equal(render(components), plain)


def _no_network(*args, **kwargs):
    raise AssertionError("the network was used")


def test_single_file_loads_offline_replaces_the_unet_and_changes_the_output(tmp_path, monkeypatch):
    import socket

    plain = plain_render()
    components = fresh_components()
    other_unet = perturbed(stock_state(components), seed=2)
    path = write_checkpoint(tmp_path / "style.safetensors", components, unet_state=other_unet)
    with monkeypatch.context() as offline:
        offline.setattr(socket.socket, "connect", _no_network)
        offline.setattr(socket, "getaddrinfo", _no_network)
        apply_base(components, path)  # blend 1
    state = components.unet.state_dict()
    for key, value in other_unet.items():
        assert torch.equal(state[key], value), key
    _assert_paca_is_pasds(components, TINY_LIGHT)
    styled = render(components)
    assert np.abs(styled.astype(int) - plain.astype(int)).mean() > 1.0


def test_blend_is_a_weighted_mean_of_stock_tensors(tmp_path):
    components = fresh_components()
    before = stock_state(components)
    other_unet = perturbed(before, seed=3)
    path = write_checkpoint(tmp_path / "style.safetensors", components, unet_state=other_unet)
    apply_base(components, path, blend=0.3)
    state = components.unet.state_dict()
    for key in before:
        expected = 0.3 * other_unet[key] + 0.7 * before[key]
        assert torch.allclose(state[key], expected, atol=1e-6, rtol=0), key
    _assert_paca_is_pasds(components, TINY_LIGHT)


def test_checkpoint_vae_and_text_encoder_replace_the_defaults(tmp_path):
    components = fresh_components()
    vae_state = perturbed(components.vae.state_dict(), seed=4)
    text_state = perturbed(components.text_encoder.state_dict(), seed=5)
    path = write_checkpoint(tmp_path / "style.safetensors", components, vae_state=vae_state, text_state=text_state)
    apply_base(components, path)
    _assert_state(components.vae.state_dict(), vae_state)
    _assert_state(components.text_encoder.state_dict(), text_state)


def test_old_clip_layout_and_damaged_position_ids_load(tmp_path):
    """Older checkpoints have no `text_model.` level under cond_stage_model.transformer, and some
    carry a float position_ids buffer with drifted values; the model's own ids must be used."""
    from safetensors.torch import load_file, save_file

    components = fresh_components()
    text_state = perturbed(components.text_encoder.state_dict(), seed=15)
    path = write_checkpoint(tmp_path / "new.safetensors", components, text_state=text_state)
    old = {
        k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
        for k, v in load_file(path).items()
    }
    old["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(77.0)[None] + 0.4
    save_file(old, str(tmp_path / "old.safetensors"))
    reference = fresh_components()
    apply_base(reference, path)
    apply_base(components, tmp_path / "old.safetensors")
    _assert_state(components.text_encoder.state_dict(), text_state)
    ids = torch.arange(20)[None]
    with torch.no_grad():
        assert torch.equal(
            components.text_encoder(ids).last_hidden_state, reference.text_encoder(ids).last_hidden_state
        )


def test_single_file_with_diffusers_unet_keys_is_a_unet(tmp_path):
    from safetensors.torch import save_file

    components = fresh_components()
    other_unet = perturbed(stock_state(components), seed=6)
    path = tmp_path / "dreambooth_unet.safetensors"
    save_file(other_unet, str(path))
    vae_before = components.vae
    report = apply_base(components, path)
    assert report.replaced == () and components.vae is vae_before
    state = components.unet.state_dict()
    assert all(torch.equal(state[k], v) for k, v in other_unet.items())


# --- folders ------------------------------------------------------------------------------------


def test_unet_folder_replaces_stock_tensors_and_keeps_paca(tmp_path):
    components = fresh_components()
    other_unet = perturbed(stock_state(components), seed=7)
    folder = write_unet_folder(tmp_path / "dreambooth", other_unet)
    assert base_kind(folder) == UNET_FOLDER
    text_before = components.text_encoder
    apply_base(components, folder)
    state = components.unet.state_dict()
    assert all(torch.equal(state[k], v) for k, v in other_unet.items())
    _assert_paca_is_pasds(components, TINY_LIGHT)
    assert components.text_encoder is text_before


def test_diffusers_folder_replaces_unet_vae_text_encoder_and_tokenizer(tmp_path):
    components = fresh_components()
    other_unet = perturbed(stock_state(components), seed=8)
    vae_state = perturbed(components.vae.state_dict(), seed=9)
    text_state = perturbed(components.text_encoder.state_dict(), seed=10)
    folder = write_diffusers_folder(tmp_path / "personal", other_unet, vae_state, text_state)
    assert base_kind(folder) == DIFFUSERS_FOLDER
    tokenizer_before = components.tokenizer
    report = apply_base(components, folder)
    assert set(report.replaced) == {"vae", "text_encoder", "tokenizer"}
    assert components.tokenizer is not tokenizer_before
    state = components.unet.state_dict()
    assert all(torch.equal(state[k], v) for k, v in other_unet.items())
    _assert_state(components.vae.state_dict(), vae_state)
    _assert_state(components.text_encoder.state_dict(), text_state)
    _assert_paca_is_pasds(components, TINY_LIGHT)
    render(components)  # the swapped parts run together


@pytest.mark.parametrize("pasd", [TINY_PASD, TINY_LIGHT], ids=["full", "light"])
def test_every_paca_tensor_stays_pasds_after_each_kind_of_swap(tmp_path, pasd):
    components = fresh_components(pasd)
    stock = stock_state(components)
    paca_keys = set(components.unet.state_dict()) - set(stock)
    assert paca_keys and paca_keys == set(paca_from_file(pasd))
    swaps = [
        write_checkpoint(tmp_path / "a.safetensors", components, unet_state=perturbed(stock, 11)),
        write_unet_folder(tmp_path / "unet_only", perturbed(stock, 12)),
        write_diffusers_folder(
            tmp_path / "full", perturbed(stock, 13), components.vae.state_dict(), components.text_encoder.state_dict()
        ),
    ]
    for blend, path in zip((1.0, 0.5, 1.0), swaps):
        apply_base(components, path, blend=blend)
        _assert_paca_is_pasds(components, pasd)
        assert not torch.equal(components.unet.state_dict()["conv_in.weight"], stock["conv_in.weight"])


# --- refusals -----------------------------------------------------------------------------------


def test_mis_shaped_base_is_refused_and_leaves_components_intact(tmp_path):
    components = fresh_components()
    other_unet = perturbed(stock_state(components), seed=14)
    other_unet["conv_in.weight"] = torch.zeros(7, 4, 3, 3)
    folder = write_unet_folder(tmp_path / "wrong", other_unet)
    before = stock_state(components)
    with pytest.raises(ModelError, match="conv_in.weight") as failure:
        apply_base(components, folder)
    assert failure.value.exit_code == 3
    _assert_state(stock_state(components), before)


def test_lora_given_as_base_is_refused_with_a_hint(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "style_lora.safetensors"
    save_file(
        {
            "lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3),
            "lora_unet_conv_in.lora_up.weight": torch.zeros(16, 2, 1, 1),
        },
        str(path),
    )
    with pytest.raises(ModelError, match="is a LoRA") as failure:
        apply_base(fresh_components(), path)
    assert "--lora" in hint_for(failure.value)  # as the command line says it


def test_sdxl_checkpoint_is_refused(tmp_path):
    from safetensors.torch import save_file

    components = fresh_components()
    state = checkpoint_from_parts(
        stock_state(components), components.unet.config, components.vae, components.text_encoder
    )
    state["conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"] = torch.zeros(4)
    path = tmp_path / "sdxl.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelError, match="Stable Diffusion 1.5"):
        apply_base(components, path)


def test_stock_keys_are_the_pasd_unet_minus_paca():
    components = fresh_components(TINY_PASD)
    stock = set(stock_unet_keys(components.unet))
    assert stock == set(stock_state(components)) and not any(".pixel_attentions." in k for k in stock)
    assert stock | set(paca_from_file(TINY_PASD)) == set(components.unet.state_dict())
