"""Every attention of the pipeline, PACA included, runs through torch's
scaled_dot_product_attention: on CUDA that is flash or memory-efficient attention (no score
matrix, no xformers), on the CPU its fused kernel. Counted by wrapping SDPA and hooking every
attention module while a tiny full-PASD and a tiny PASD-light image are made."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from conftest import LR_INPUT, TINY_BASE, TINY_LIGHT
from diffusers.models.attention_processor import Attention
from PIL import Image

from pasd_cli.engine import UpscaleSettings
from pasd_cli.engine.pipeline import PASDPipeline

SETTINGS = UpscaleSettings(steps=1, guidance=9.0, scale=2, process_size=64, vae_tile=0, vae_attention_window=0)


def attention_modules(pipeline) -> dict[str, torch.nn.Module]:
    """Every attention module: diffusers' Attention in the UNet (PACA's among them), the
    ControlNet and the VAE, and the CLIP text encoder's self-attention."""
    found = {}
    for part in ("unet", "controlnet", "text_encoder"):
        for name, module in getattr(pipeline, part).named_modules():
            clip_attention = part == "text_encoder" and type(module).__name__.endswith("Attention")
            if isinstance(module, Attention) or clip_attention:
                found[f"{part}.{name}"] = module
    for name, module in pipeline.vae.vae.named_modules():
        if isinstance(module, Attention):
            found[f"vae.{name}"] = module
    return found


@pytest.fixture(scope="module")
def light_pipeline():
    return PASDPipeline.from_folders(TINY_LIGHT, TINY_BASE, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("which", ["tiny_pipeline", "light_pipeline"])
def test_every_attention_call_is_one_sdpa_call(which, request, monkeypatch):
    pipeline = request.getfixturevalue(which)
    modules = attention_modules(pipeline)
    paca = [name for name in modules if "pixel_attentions" in name or name.endswith("attn2_plus")]
    assert paca and any(name.startswith("vae.") for name in modules)
    assert any(name.startswith("text_encoder.") for name in modules)

    calls: Counter[str] = Counter()
    sdpa_calls = []
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        sdpa_calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    hooks = [
        module.register_forward_hook(lambda module, args, out, name=name: calls.update([name]))
        for name, module in modules.items()
    ]
    try:
        pipeline.upscale(Image.open(LR_INPUT), SETTINGS)
    finally:
        for hook in hooks:
            hook.remove()
    assert set(calls) == set(modules), set(modules) - set(calls)  # each one ran
    assert all(calls[name] > 0 for name in paca)
    # The VAE's global attention on a small latent is one SDPA call per pass; every other
    # attention module call is exactly one.
    assert len(sdpa_calls) == sum(calls.values())
