"""The Real-ISR pipeline as the released script runs it, one numbered step per stage (spec
section 4). The engine takes plain values: a PIL image, settings, a device and a dtype."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..settings import UpscaleSettings
from .color import COLOR_FIXES
from .denoise import Guidance, NoisePredictor
from .loading import Components, load_components, model_dtypes
from .noise import initial_latents, standard_normal_draws
from .prompts import build_prompt, prompt_embeddings
from .resize import final_resize, make_hint
from .schedulers import schedule_sigmas
from .vae import VaeCodec

# progress(stage, done, total): stage is "step" or "tile".
Progress = Callable[[str, int, int], None]
# trace(name, value): sees each intermediate named as in the reference bundle, for debugging
# and parity tests.
Trace = Callable[[str, object], None]


def _no_trace(name: str, value: object) -> None:
    pass


@dataclass
class UpscaleResult:
    image: Image.Image
    prompt: str
    hint_size: tuple[int, int]


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> uint8 (3, H, W)."""
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


def tensor_to_image(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).cpu().numpy())


def decoded_to_uint8(decoded: torch.Tensor) -> torch.Tensor:
    """Raw decoder output (1, 3, H, W) -> uint8 (3, H, W): diffusers' postprocess, rounding."""
    return ((decoded[0] / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


class PASDPipeline:
    def __init__(self, components: Components, device: torch.device, dtype: torch.dtype):
        from diffusers import UniPCMultistepScheduler

        self.device, self.dtype = torch.device(device), dtype
        net_dtype, vae_dtype = model_dtypes(self.device, dtype, components.vae)
        self.unet = components.unet.to(self.device, net_dtype)
        self.controlnet = components.controlnet.to(self.device, net_dtype)
        self.text_encoder = components.text_encoder.to(self.device, net_dtype)
        self.tokenizer = components.tokenizer
        self.vae = VaeCodec(components.vae.to(self.device, vae_dtype))
        scheduler_class = components.scheduler_class or UniPCMultistepScheduler
        self._scheduler_config = scheduler_class.from_config(components.scheduler_config).config
        self._scheduler_class = scheduler_class

    @classmethod
    def from_folders(cls, pasd_dir: Path, base_dir: Path, device: torch.device,
                     dtype: torch.dtype) -> "PASDPipeline":
        return cls(load_components(Path(pasd_dir), Path(base_dir)), device, dtype)

    def new_scheduler(self, steps: int, seed: int = 0):
        scheduler = self._scheduler_class.from_config(self._scheduler_config)
        scheduler.set_timesteps(steps, device=self.device)
        if hasattr(scheduler, "seed_step_noise"):  # schedulers that draw noise between steps (LCM)
            scheduler.seed_step_noise(seed)
        return scheduler

    def encode_prompts(self, prompt: str, negative_prompt: str, cfg: bool) -> torch.Tensor:
        return prompt_embeddings(self.tokenizer, self.text_encoder, prompt, negative_prompt, cfg)

    def initial_latents(self, hint: torch.Tensor, scheduler, settings: UpscaleSettings) -> torch.Tensor:
        mean, std = self.vae.encode_moments(hint)
        draws = standard_normal_draws(mean.shape, torch.Generator("cpu").manual_seed(settings.seed))
        latents = initial_latents(mean, std, scheduler.timesteps, schedule_sigmas(scheduler),
                                  settings.added_noise_level, self.vae.scaling_factor, draws)
        return latents * scheduler.init_noise_sigma

    def noise_predictor(self, prompt_embeds, hint, settings, progress: Progress | None = None):
        on_tile = (lambda done, total: progress("tile", done, total)) if progress else None
        return NoisePredictor(
            self.unet, self.controlnet, prompt_embeds, hint,
            Guidance(settings.guidance, settings.conditioning_scale),
            settings.latent_tile, settings.latent_overlap, settings.tile_batch, settings.blend,
            dtype=self.unet.dtype, on_tile=on_tile)

    @torch.inference_mode()
    def upscale(self, lr_image: Image.Image, settings: UpscaleSettings, caption: str | None = None,
                progress: Progress | None = None, trace: Trace = _no_trace,
                label: str | None = None) -> UpscaleResult:
        """`caption` or `label`: the image's high-level information (spec section 5), as
        `build_prompt` combines it with the settings' prompts."""
        # 1. The hint image: upscaled, enlarged to the process size, sides multiples of 8.
        lr_image = lr_image.convert("RGB")
        hint_image = make_hint(lr_image, settings.scale, settings.process_size)
        hint_uint8 = image_to_tensor(hint_image)
        hint = (hint_uint8.float() / 255.0).unsqueeze(0).to(self.device)
        trace("upscaled_input_uint8", hint_uint8)

        # 2. Prompts: [negative; positive] with guidance.
        prompt = build_prompt(settings.prompt, settings.added_prompt, caption=caption, label=label)
        prompt_embeds = self.encode_prompts(prompt, settings.negative_prompt, settings.uses_cfg)
        trace("prompt", prompt)
        trace("prompt_embeds", prompt_embeds)

        # 3. Scheduler and the adjustable-noise initial latents.
        scheduler = self.new_scheduler(settings.steps, settings.seed)
        latents = self.initial_latents(hint, scheduler, settings)
        trace("timesteps", scheduler.timesteps)
        trace("initial_latents", latents)

        # 4. Denoising loop.
        predict = self.noise_predictor(prompt_embeds, hint, settings, progress)
        for index, t in enumerate(scheduler.timesteps):
            eps = predict(latents, t)
            latents = scheduler.step(eps, t, latents).prev_sample
            trace("noise_pred", eps)
            trace("latents_after_step", latents)
            if progress:
                progress("step", index + 1, len(scheduler.timesteps))
        del predict

        # 5. Decode to uint8, rounding.
        decoded = self.vae.decode(latents / self.vae.scaling_factor)
        trace("decoded", decoded)
        sr_uint8 = decoded_to_uint8(decoded).cpu()
        trace("pipeline_output_uint8", sr_uint8)

        # 6. Colour fix against the hint, truncating.
        if settings.color_fix != "none":
            sr_uint8 = COLOR_FIXES[settings.color_fix](sr_uint8, hint_uint8)
            trace("color_fixed_uint8", sr_uint8)

        # 7. Back to the requested output size.
        image = final_resize(tensor_to_image(sr_uint8), lr_image.size, settings.scale)
        return UpscaleResult(image=image, prompt=prompt, hint_size=hint_image.size)
