"""Schedulers other than the released UniPC: the LCM scheduler for the LCM-LoRA fast mode.

The pipeline builds whatever scheduler class `Components.scheduler_class` names (UniPC when
None) from SD's scheduler config. PASD's adjustable noise schedule needs each timestep's sigma;
UniPC carries them, LCM does not, so `schedule_sigmas` derives them from the same betas.
"""

from __future__ import annotations

import torch
from diffusers import LCMScheduler

# Keeps LCM's between-step noise apart from the three draws of the adjustable noise schedule,
# which a generator seeded with the bare seed supplies.
_STEP_NOISE_STREAM = 0x4C434D


class SeededLCMScheduler(LCMScheduler):
    """LCM whose between-step noise comes from a seeded CPU generator, so a seed fixes the result
    on every device; diffusers would draw from torch's global generator."""

    _step_generator: torch.Generator | None = None

    def seed_step_noise(self, seed: int) -> None:
        self._step_generator = torch.Generator("cpu").manual_seed(seed ^ _STEP_NOISE_STREAM)

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        return super().step(
            model_output,
            timestep,
            sample,
            generator=generator if generator is not None else self._step_generator,
            return_dict=return_dict,
        )


def schedule_sigmas(scheduler) -> torch.Tensor:
    """sigma = sqrt((1 - alpha_bar) / alpha_bar) at each timestep of the current schedule."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None:
        return sigmas
    alphas_cumprod = scheduler.alphas_cumprod[scheduler.timesteps.cpu().long()]
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
