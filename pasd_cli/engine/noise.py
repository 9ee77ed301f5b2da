"""PASD's adjustable noise schedule: the initial latents (spec section 4, step 4).

The released code noises the encoded image twice through the scheduler's `add_noise`, which looks
a timestep up in the *current* schedule: a level absent from it maps to the last index, one
present twice to the second occurrence. We reproduce that lookup on purpose, since it decides
how much of the image survives (with 20 steps: about 7%).
"""

from __future__ import annotations

import torch


def released_step_index(timesteps: torch.Tensor, level: int) -> int:
    matches = (timesteps == level).nonzero().flatten().tolist()
    if not matches:
        return len(timesteps) - 1
    return matches[1] if len(matches) > 1 else matches[0]


def _alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # float32 tensor arithmetic, as the scheduler does it, keeps the result bit-identical.
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha, sigma * alpha


def standard_normal_draws(shape, generator: torch.Generator, count: int = 3) -> list[torch.Tensor]:
    """The generator's draws in the released order: posterior sample, first-timestep noise,
    added noise. Always float32 on the CPU so results do not depend on the device."""
    return [torch.randn(shape, generator=generator, dtype=torch.float32) for _ in range(count)]


def initial_latents(
    posterior_mean: torch.Tensor,
    posterior_std: torch.Tensor,
    timesteps: torch.Tensor,
    sigmas: torch.Tensor,
    added_noise_level: int,
    scaling_factor: float,
    draws: list[torch.Tensor],
) -> torch.Tensor:
    eps_posterior, noise_first, noise_added = (d.to(posterior_mean.device) for d in draws)
    z0 = scaling_factor * (posterior_mean + posterior_std * eps_posterior)
    sigmas = sigmas.to(posterior_mean.device)
    alpha, sigma = _alpha_sigma(sigmas[0])
    x = alpha * z0 + sigma * noise_first
    alpha, sigma = _alpha_sigma(sigmas[released_step_index(timesteps, added_noise_level)])
    return alpha * x + sigma * noise_added
