"""Test-side writer of single-file checkpoints in the original LDM (CompVis / civitai) key layout.

The inverse of the diffusers naming, written from the LDM module structure (input_blocks /
middle_block / output_blocks, `first_stage_model.` encoder.down / decoder.up with reversed up
order, `cond_stage_model.transformer.`), independently of the converters under test. A test
checks that it round-trips through diffusers' converters.
"""

from __future__ import annotations

import re

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    layer, _, param = rest.partition(".")
    return f"{_UNET_RESNET[layer]}.{param}"


def unet_key_to_ldm(key: str, layers_per_block: int, up_blocks_with_attention: set[int]) -> str:
    per = layers_per_block + 1
    for diffusers, ldm in _UNET_TOP.items():
        if key.startswith(diffusers + "."):
            return ldm + key[len(diffusers) :]
    if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        b, layer, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{b * per + layer + 1}.0.{_resnet(rest)}"
    if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        b, layer, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{b * per + layer + 1}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        b, layer, rest = int(m[1]), int(m[2]), m[3]
        return f"output_blocks.{b * per + layer}.0.{_resnet(rest)}"
    if m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        b, layer, rest = int(m[1]), int(m[2]), m[3]
        return f"output_blocks.{b * per + layer}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        b = int(m[1])
        slot = 2 if b in up_blocks_with_attention else 1
        return f"output_blocks.{b * per + layers_per_block}.{slot}.conv.{m[2]}"
    raise KeyError(f"no LDM name for UNet key {key}")


def unet_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    with_attention = {i for i, kind in enumerate(config["up_block_types"]) if "CrossAttn" in kind}
    return {UNET_PREFIX + unet_key_to_ldm(k, config["layers_per_block"], with_attention): v for k, v in state.items()}


def _vae_resnet(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut")


def vae_key_to_ldm(key: str, up_blocks: int) -> tuple[str, bool]:
    """(LDM key, whether the tensor is an attention projection stored as a 1x1 conv in LDM)."""
    part, _, rest = key.partition(".")
    if part in ("quant_conv", "post_quant_conv"):
        return key, False
    if rest.startswith("conv_norm_out."):
        return f"{part}.norm_out.{rest.split('.', 1)[1]}", False
    if rest.startswith(("conv_in.", "conv_out.")):
        return key, False
    if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        return f"{part}.down.{m[1]}.block.{m[2]}.{_vae_resnet(m[3])}", False
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", rest):
        return f"{part}.down.{m[1]}.downsample.conv.{m[2]}", False
    if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        return f"{part}.up.{up_blocks - 1 - int(m[1])}.block.{m[2]}.{_vae_resnet(m[3])}", False
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", rest):
        return f"{part}.up.{up_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}", False
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", rest):
        return f"{part}.mid.block_{int(m[1]) + 1}.{_vae_resnet(m[2])}", False
    if m := re.match(r"mid_block\.attentions\.0\.(.+)\.(weight|bias)", rest):
        layer = _VAE_ATTENTION[m[1]]
        return f"{part}.mid.attn_1.{layer}.{m[2]}", layer != "norm" and m[2] == "weight"
    raise KeyError(f"no LDM name for VAE key {key}")


def vae_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        name, conv = vae_key_to_ldm(key, len(config["up_block_types"]))
        out[VAE_PREFIX + name] = value[:, :, None, None] if conv else value
    return out


def clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel keys, with or without the `text_model.` wrapper, to the LDM layout."""
    return {CLIP_PREFIX + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}


def checkpoint_from_parts(unet_state, unet_config, vae, text_encoder) -> dict[str, torch.Tensor]:
    """A whole LDM checkpoint from a stock UNet state dict and loaded VAE / text encoder modules."""
    state = unet_to_ldm(unet_state, unet_config)
    state.update(vae_to_ldm(vae.state_dict(), vae.config))
    state.update(clip_to_ldm(text_encoder.state_dict()))
    return {k: v.contiguous().clone() for k, v in state.items()}
