"""Fast mode: an LCM-LoRA fused, the LCM scheduler sampling in few steps, seeded end to end; and
the UniPC path untouched by the scheduler hook."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import UniPCMultistepScheduler
from tiny_bases import fresh_components, kohya_name, lora_pair, plain_render, render, write_kohya_lora

from pasd_cli.engine import FAST_GUIDANCE, FAST_STEPS, LoraSpec
from pasd_cli.engine.noise import _alpha_sigma
from pasd_cli.engine.pipeline import PASDPipeline
from pasd_cli.engine.schedulers import SeededLCMScheduler, schedule_sigmas
from pasd_cli.engine.stylize import personalize, use_lcm

LCM_LAYERS = [
    "down_blocks.0.attentions.0.proj_in",
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
    "up_blocks.3.resnets.2.conv2",
]


def _tiny_lcm_lora(components, path):
    layers = {}
    for i, name in enumerate(LCM_LAYERS):
        down, up = lora_pair(components.unet.get_submodule(name).weight, 4, 40 + i)
        layers[kohya_name(name)] = (0.2 * down, up, 2.0)
    return write_kohya_lora(path, layers)


def _fast(components, seed=7):
    return render(components, seed=seed, steps=FAST_STEPS, guidance=FAST_GUIDANCE)


def test_lcm_fast_mode_runs_in_few_steps_and_a_seed_fixes_the_result(tmp_path):
    components = fresh_components()
    report = use_lcm(components, _tiny_lcm_lora(components, tmp_path / "lcm.safetensors"))
    assert report.unet_layers == len(LCM_LAYERS)
    pipeline = PASDPipeline(components, torch.device("cpu"), torch.float32)
    scheduler = pipeline.new_scheduler(FAST_STEPS, seed=7)
    assert isinstance(scheduler, SeededLCMScheduler) and len(scheduler.timesteps) == FAST_STEPS
    torch.manual_seed(1)
    first = _fast(components)
    torch.manual_seed(2)  # the global generator must not matter
    second = _fast(components)
    assert np.array_equal(first, second)
    assert not np.array_equal(first, _fast(components, seed=8))
    assert first.shape == plain_render().shape and first.std() > 1.0


def test_lcm_step_noise_follows_the_image_seed_during_denoising(tmp_path):
    """Same initial latents, two seeds: LCM's between-step noise must come from the image's seed
    (UniPC draws none, so there the seed only acts through the initial latents)."""
    from dataclasses import replace

    from pasd_cli.engine import UpscaleSettings

    components = fresh_components()
    use_lcm(components, _tiny_lcm_lora(components, tmp_path / "lcm.safetensors"))
    pipeline = PASDPipeline(components, torch.device("cpu"), torch.float32)
    settings = UpscaleSettings(steps=FAST_STEPS, guidance=FAST_GUIDANCE, seed=7)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hint = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    embeds = pipeline.encode_prompts("a photo", "", cfg=False)

    def run(seed):
        with torch.inference_mode():
            return pipeline.denoise(latents, embeds, hint, replace(settings, seed=seed), settings.latent_tile)

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_lcm_sigmas_give_the_schedulers_own_noising():
    """The adjustable-noise schedule works from sigmas; for LCM, derived ones must noise a latent
    exactly as LCMScheduler.add_noise does at each of its timesteps."""
    components = fresh_components()
    scheduler = SeededLCMScheduler.from_config(components.scheduler_config)
    scheduler.set_timesteps(FAST_STEPS)
    sigmas = schedule_sigmas(scheduler)
    generator = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 4, 8, 8, generator=generator)
    for index, t in enumerate(scheduler.timesteps):
        alpha, sigma = _alpha_sigma(sigmas[index])
        expected = scheduler.add_noise(z0, noise, t.reshape(1))
        assert torch.allclose(alpha * z0 + sigma * noise, expected, atol=1e-6, rtol=0), int(t)


def test_unipc_keeps_its_own_sigmas():
    pipeline = PASDPipeline(fresh_components(), torch.device("cpu"), torch.float32)
    scheduler = pipeline.new_scheduler(20)
    assert isinstance(scheduler, UniPCMultistepScheduler)  # the released UniPC (made portable: test_unipc_devices)
    assert schedule_sigmas(scheduler) is scheduler.sigmas


def test_personalize_applies_base_loras_and_lcm_in_order(tmp_path):
    components = fresh_components()
    module = "down_blocks.0.attentions.0.proj_in"
    down, up = lora_pair(components.unet.get_submodule(module).weight, 4, 50)
    style = write_kohya_lora(tmp_path / "style.safetensors", {kohya_name(module): (down, up, 4.0)})
    lcm = _tiny_lcm_lora(components, tmp_path / "lcm.safetensors")
    before = components.unet.get_submodule(module).weight.clone()
    stages = []
    report = personalize(
        components,
        loras=[LoraSpec(str(style), 0.5)],
        lcm_lora=lcm,
        on_stage=lambda what, source: stages.append((what, source.name)),
    )
    assert stages == [("lora", "style.safetensors"), ("lcm", "lcm.safetensors")]
    assert report.base is None and len(report.loras) == 1 and report.lcm is not None
    assert components.scheduler_class is SeededLCMScheduler
    lcm_down, lcm_up = lora_pair(before, 4, 40)
    expected = (
        before
        + 0.5 * (up[:, :, 0, 0] @ down[:, :, 0, 0])[..., None, None]
        + (2.0 / 4) * (lcm_up[:, :, 0, 0] @ (0.2 * lcm_down)[:, :, 0, 0])[..., None, None]
    )
    assert torch.allclose(components.unet.get_submodule(module).weight, expected, atol=1e-6, rtol=0)
