"""Tiny personalized bases and LoRAs, built at test time from the tiny reference model."""

from __future__ import annotations

import json
import shutil
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from conftest import LR_INPUT, TINY_BASE, TINY_LIGHT
from ldm_layout import checkpoint_from_parts
from PIL import Image
from safetensors.torch import load_file, save_file

from pasd_cli.engine import StylizeSettings
from pasd_cli.engine.bases import stock_unet_keys
from pasd_cli.engine.loading import load_components
from pasd_cli.engine.pipeline import PASDPipeline

WEIGHTS = "diffusion_pytorch_model.safetensors"


def fresh_components(pasd: Path = TINY_LIGHT):
    return load_components(pasd, TINY_BASE)


def stock_state(components) -> dict[str, torch.Tensor]:
    state = components.unet.state_dict()
    return {k: state[k].clone() for k in stock_unet_keys(components.unet)}


def paca_from_file(pasd: Path) -> dict[str, torch.Tensor]:
    """The PACA tensors exactly as the PASD checkpoint file stores them."""
    state = load_file(pasd / "unet" / WEIGHTS)
    stock = set(load_file(TINY_BASE / "unet" / WEIGHTS))
    paca = {k: v for k, v in state.items() if k not in stock}
    assert paca, "the checkpoint holds no PACA tensors"
    return paca


def perturbed(state: dict[str, torch.Tensor], seed: int, amount: float = 0.5) -> dict[str, torch.Tensor]:
    """Every tensor moved by `amount` of its own spread: a different, still sane, model."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state.items():
        spread = value.float().std() if value.numel() > 1 else value.float().abs().clamp(min=1e-3)
        noise = torch.randn(value.shape, generator=generator)
        out[key] = (value.float() + amount * spread * noise).to(value.dtype).contiguous()
    return out


def write_checkpoint(path: Path, components, unet_state=None, vae_state=None, text_state=None) -> Path:
    """A single-file checkpoint in the LDM layout; parts default to the components' own."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    vae, text_encoder = components.vae, components.text_encoder
    if vae_state is not None:
        vae = AutoencoderKL.from_config(vae.config)
        vae.load_state_dict(vae_state)
    if text_state is not None:
        text_encoder = CLIPTextModel(text_encoder.config)
        text_encoder.load_state_dict(text_state)
    state = checkpoint_from_parts(
        unet_state if unet_state is not None else stock_state(components), components.unet.config, vae, text_encoder
    )
    save_file(state, str(path))
    return path


def write_unet_folder(folder: Path, unet_state) -> Path:
    folder.mkdir(parents=True)
    shutil.copy(TINY_BASE / "unet" / "config.json", folder / "config.json")
    save_file({k: v.contiguous() for k, v in unet_state.items()}, str(folder / WEIGHTS))
    return folder


def write_diffusers_folder(folder: Path, unet_state, vae_state, text_state) -> Path:
    shutil.copytree(TINY_BASE, folder)
    save_file({k: v.contiguous() for k, v in unet_state.items()}, str(folder / "unet" / WEIGHTS))
    save_file({k: v.contiguous() for k, v in vae_state.items()}, str(folder / "vae" / WEIGHTS))
    # Stored with the `text_model.` wrapper, as the reference files are.
    save_file(
        {("text_model." + k if not k.startswith("text_model.") else k): v.contiguous() for k, v in text_state.items()},
        str(folder / "text_encoder" / "model.safetensors"),
    )
    return folder


def kohya_name(module: str, text_encoder: bool = False) -> str:
    """Kohya's rule: prefix + the diffusers / transformers module path with dots as underscores."""
    if text_encoder:
        return "lora_te_" + ("text_model." + module.removeprefix("text_model.")).replace(".", "_")
    return "lora_unet_" + module.replace(".", "_")


def lora_pair(weight: torch.Tensor, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) shaped for a linear or conv weight; the kernel rides on down, up is 1x1."""
    generator = torch.Generator().manual_seed(seed)
    out_features, in_features = weight.shape[:2]
    kernel = tuple(weight.shape[2:])
    down = torch.randn((rank, in_features, *kernel), generator=generator) * 0.3
    up = torch.randn((out_features, rank, *((1,) * len(kernel))), generator=generator) * 0.3
    return down, up


def write_kohya_lora(path: Path, layers: dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]) -> Path:
    state = {}
    for name, (down, up, alpha) in layers.items():
        state[f"{name}.lora_down.weight"] = down.clone()
        state[f"{name}.lora_up.weight"] = up.clone()
        if alpha is not None:
            state[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(state, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


def render(components, seed: int = 7, **overrides) -> np.ndarray:
    """The stylize pipeline on the test image, tiny and fast: 2 steps at a 64-pixel short side."""
    settings = StylizeSettings(**{"steps": 2, "process_size": 64, "seed": seed, **overrides})
    pipeline = PASDPipeline(components, torch.device("cpu"), torch.float32)
    return np.asarray(pipeline.upscale(Image.open(LR_INPUT), settings).image)


@lru_cache(maxsize=1)
def _plain_render() -> bytes:
    return render(fresh_components()).tobytes()


def plain_render() -> np.ndarray:
    """`render` of the untouched tiny light model, computed once per session."""
    return np.frombuffer(_plain_render(), dtype=np.uint8).reshape(render_shape())


def render_shape() -> tuple[int, int, int]:
    with Image.open(LR_INPUT) as image:
        return image.height, image.width, 3


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
