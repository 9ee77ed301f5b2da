"""The schedulers: the released UniPC, made to run on every device, and the LCM scheduler for the
LCM-LoRA fast mode.

The pipeline builds whatever scheduler class `Components.scheduler_class` names
(`PortableUniPCScheduler` when None) from SD's scheduler config. PASD's adjustable noise schedule
needs each timestep's sigma; UniPC carries them, LCM does not, so `schedule_sigmas` derives them
from the same betas.
"""

from __future__ import annotations

import functools

import torch
from diffusers import LCMScheduler, UniPCMultistepScheduler
from torch.overrides import TorchFunctionMode

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


@functools.cache
def has_linalg_solve(device: str) -> bool:
    """Whether `device` implements torch.linalg.solve (MPS did not before torch 2.7); asked once
    per device and process."""
    try:
        torch.linalg.solve(torch.eye(2, device=device), torch.ones(2, device=device))
    except NotImplementedError:
        return False
    return True


class _SolveOnCpu(TorchFunctionMode):
    """Runs every torch.linalg.solve on the CPU and moves the solution back."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.linalg.solve:
            matrix, rhs, *rest = args
            return func(matrix.cpu(), rhs.cpu(), *rest, **kwargs).to(matrix.device)
        return func(*args, **kwargs)


class PortableUniPCScheduler(UniPCMultistepScheduler):
    """UniPC that also runs where the latents' device has no torch.linalg.solve.

    From its third step on, UniPC finds its corrector's coefficients with torch.linalg.solve on a
    system of (order x order) built on the latents' device; on a device without that op every
    run of three steps or more would fail. There the solve (a few numbers) runs on the CPU. The
    solve sits deep inside diffusers' update methods, so rather than copying them, each step runs
    under a torch function mode that reroutes that one call; devices with the op are untouched."""

    _solve_on_cpu = False

    def set_timesteps(self, num_inference_steps=None, device=None, *args, **kwargs):
        super().set_timesteps(num_inference_steps, device, *args, **kwargs)
        self._solve_on_cpu = device is not None and not has_linalg_solve(str(torch.device(device)))

    def step(self, *args, **kwargs):
        if not self._solve_on_cpu:
            return super().step(*args, **kwargs)
        with _SolveOnCpu():
            return super().step(*args, **kwargs)


def schedule_sigmas(scheduler) -> torch.Tensor:
    """sigma = sqrt((1 - alpha_bar) / alpha_bar) at each timestep of the current schedule."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None:
        return sigmas
    alphas_cumprod = scheduler.alphas_cumprod[scheduler.timesteps.cpu().long()]
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
