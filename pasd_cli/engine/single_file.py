"""Single-file Stable Diffusion 1.5 checkpoints in the original LDM layout (as civitai ships them),
converted offline with diffusers' own LDM converters: the UNet with a given UNet config (the
loaded PASD UNet's), the VAE and text encoder with the configs of the parts they replace, or the
SD 1.5 configs shipped in `configs/sd15`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelError
from ..nn.loading import check_state_dict
from .formats import LDM_UNET_PREFIX, LORA_PREFIXES
from .weights import read_state_dict

SD15_CONFIGS = Path(__file__).parent / "configs" / "sd15"
LDM_VAE_PREFIX = "first_stage_model."
LDM_CLIP_PREFIX = "cond_stage_model.transformer."
TEXT_MODEL_PREFIX = "text_model."


def sd15_config(part: str) -> dict:
    """The shipped SD 1.5 config of `part`: "unet", "vae" or "text_encoder"."""
    return json.loads((SD15_CONFIGS / f"{part}.json").read_text())


def build_vae(state: dict[str, torch.Tensor], config: dict, source: Path, dtype=torch.float32):
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(dict(config))
    check_state_dict(vae, state, source)
    vae.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return vae.eval().requires_grad_(False)


def _align_prefix(state: dict[str, torch.Tensor], expected: set[str], prefix: str) -> dict[str, torch.Tensor]:
    # transformers >= 5.6 dropped CLIPTextModel's `text_model.` wrapper; files have either form.
    wants = any(k.startswith(prefix) for k in expected)
    has = any(k.startswith(prefix) for k in state)
    if has and not wants:
        return {k.removeprefix(prefix): v for k, v in state.items()}
    if wants and not has:
        return {prefix + k: v for k, v in state.items()}
    return state


def build_text_encoder(state: dict[str, torch.Tensor], config, source: Path, dtype=torch.float32):
    from transformers import CLIPTextConfig, CLIPTextModel

    if not isinstance(config, CLIPTextConfig):
        config = CLIPTextConfig.from_dict(dict(config))
    with torch.device("meta"):
        skeleton = CLIPTextModel(config)
    expected = set(skeleton.state_dict())
    # position_ids is a buffer the model builds itself; old files carry it, sometimes damaged.
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    state = {k: v.to(dtype) for k, v in _align_prefix(state, expected, TEXT_MODEL_PREFIX).items()}
    check_state_dict(skeleton, state, source)
    # In `dtype`, not in the config's: a config taken from a model loaded in half precision says
    # float16, and the weights would be rounded to it.
    model = CLIPTextModel.from_pretrained(None, config=config, state_dict=state, dtype=dtype)
    return model.eval().requires_grad_(False)


@dataclass
class SingleFileParts:
    unet: dict[str, torch.Tensor]
    vae: object | None
    text_encoder: object | None


def check_sd15_checkpoint(state: dict[str, torch.Tensor], source: Path) -> None:
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    if not any(k.startswith(LDM_UNET_PREFIX) for k in state):
        if state and all(k.startswith(LORA_PREFIXES) for k in state):
            raise ModelError(f"{source} is a LoRA, not a base model", hint="pass it as a LoRA", field="loras")
        raise ModelError(f"{source} holds no UNet in the original (LDM) layout (no keys under {LDM_UNET_PREFIX})")
    model_type = infer_diffusers_model_type(state)
    if model_type != "v1":
        raise ModelError(
            f"{source} is a Stable Diffusion '{model_type}' checkpoint; PASD's bases "
            "must be Stable Diffusion 1.5 models"
        )


def read_single_file(
    path: Path,
    unet_config: dict | None = None,
    vae_config: dict | None = None,
    text_encoder_config=None,
    trust_pickle: bool = False,
    dtype: torch.dtype = torch.float32,
) -> SingleFileParts:
    """Convert a civitai/LDM checkpoint with diffusers' converters; configs default to SD 1.5's."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    path = Path(path)
    state = read_state_dict(path, trust_pickle)
    if "conv_in.weight" in state and not any(k.startswith(LDM_UNET_PREFIX) for k in state):
        return SingleFileParts(state, None, None)  # a lone UNet in diffusers layout
    check_sd15_checkpoint(state, path)
    unet = convert_ldm_unet_checkpoint(state, dict(sd15_config("unet") if unet_config is None else unet_config))
    vae = text_encoder = None
    if any(k.startswith(LDM_VAE_PREFIX) for k in state):
        config = dict(sd15_config("vae") if vae_config is None else vae_config)
        vae = build_vae(convert_ldm_vae_checkpoint(state, config), config, path, dtype)
    # Any CLIP key, not diffusers' marker key: older files lack the `text_model.` level.
    if any(k.startswith(LDM_CLIP_PREFIX) for k in state):
        config = sd15_config("text_encoder") if text_encoder_config is None else text_encoder_config
        text_encoder = build_text_encoder(convert_ldm_clip_checkpoint(state), config, path, dtype)
    return SingleFileParts(unet, vae, text_encoder)
