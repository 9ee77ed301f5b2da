"""ControlNet and UNet forward passes against the released implementation (reference A, B, E)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_LIGHT, TINY_PASD

from pasd_cli.nn.loading import load_pasd_controlnet, load_pasd_unet

TOL = dict(rtol=1e-4, atol=1e-4)
CASES = [
    (TINY_PASD, "controlnet_fwd", "unet_fwd", "full"),
    (TINY_LIGHT, "light_controlnet_fwd", "light_unet_fwd", "light"),
]


@pytest.mark.parametrize("folder,cn_key,unet_key,variant", CASES, ids=["full", "light"])
def test_controlnet_and_unet_forward_match_reference(reference, folder, cn_key, unet_key, variant):
    controlnet = load_pasd_controlnet(folder / "controlnet")
    unet = load_pasd_unet(folder / "unet")
    assert unet.paca_variant == variant
    cn_ref = reference[cn_key]
    with torch.no_grad():
        down, mid = controlnet(
            cn_ref["sample"],
            cn_ref["timestep"],
            encoder_hidden_states=cn_ref["encoder_hidden_states"],
            controlnet_cond=cn_ref["controlnet_cond"],
            conditioning_scale=cn_ref["conditioning_scale"],
            return_dict=False,
        )
    assert len(down) == len(cn_ref["out_down_block_res_samples"]) == 12
    for ours, theirs in zip(down, cn_ref["out_down_block_res_samples"]):
        torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(mid, cn_ref["out_mid_block_res_sample"], **TOL)

    unet_ref = reference[unet_key]
    with torch.no_grad():
        eps = unet(
            unet_ref["sample"],
            unet_ref["timestep"],
            unet_ref["encoder_hidden_states"],
            down_block_additional_residuals=unet_ref["down_block_additional_residuals"],
            mid_block_additional_residual=unet_ref["mid_block_additional_residual"],
            return_dict=False,
        )[0]
    torch.testing.assert_close(eps, unet_ref["out_noise_pred"], **TOL)


def test_pixel_attention_changes_the_output(reference):
    """The PACA layers are live: zeroing one PACA output projection changes the prediction."""
    unet = load_pasd_unet(TINY_PASD / "unet")
    ref = reference["unet_fwd"]
    args = (ref["sample"], ref["timestep"], ref["encoder_hidden_states"])
    kwargs = dict(
        down_block_additional_residuals=ref["down_block_additional_residuals"],
        mid_block_additional_residual=ref["mid_block_additional_residual"],
        return_dict=False,
    )
    with torch.no_grad():
        before = unet(*args, **kwargs)[0]
        unet.up_blocks[3].pixel_attentions[2].proj_out.weight.zero_()
        unet.up_blocks[3].pixel_attentions[2].proj_out.bias.zero_()
        after = unet(*args, **kwargs)[0]
    assert (before - after).abs().max() > 1e-3


def test_unet_refuses_to_run_without_residuals(reference):
    unet = load_pasd_unet(TINY_PASD / "unet")
    ref = reference["unet_fwd"]
    with pytest.raises(ValueError, match="residuals"):
        unet(ref["sample"], ref["timestep"], ref["encoder_hidden_states"])


def test_drm_embedding_once_equals_embedding_every_call(reference):
    """The engine embeds the hint once; the ControlNet output must not change."""
    controlnet = load_pasd_controlnet(TINY_PASD / "controlnet")
    ref = reference["controlnet_fwd"]
    common = dict(
        encoder_hidden_states=ref["encoder_hidden_states"],
        conditioning_scale=ref["conditioning_scale"],
        return_dict=False,
    )
    with torch.no_grad():
        down_a, mid_a = controlnet(ref["sample"], ref["timestep"], controlnet_cond=ref["controlnet_cond"], **common)
        hint = controlnet.embed_hint(ref["controlnet_cond"])
        down_b, mid_b = controlnet(ref["sample"], ref["timestep"], controlnet_cond=hint, **common)
    for a, b in zip(down_a, down_b):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mid_a, mid_b, rtol=1e-6, atol=1e-6)
