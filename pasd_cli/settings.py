"""Every option's default, in one place. Frozen dataclasses passed from the CLI to the engine."""

from __future__ import annotations

from dataclasses import dataclass

# The released script's defaults (spec section 4); only the output scale differs (4, not 1).
ADDED_PROMPT = "clean, high-resolution, 8k"
NEGATIVE_PROMPT = "blurry, dotted, noise, raster lines, unclear, lowres, over-smoothed"
COLOR_FIXES = ("wavelet", "adain", "none")
BLENDS = ("gaussian", "ramp")
MIN_VAE_TILE = 64


@dataclass(frozen=True)
class UpscaleSettings:
    steps: int = 20
    guidance: float = 9.0
    conditioning_scale: float = 1.0
    scale: float = 4.0
    process_size: int = 768
    added_noise_level: int = 900
    prompt: str = ""
    added_prompt: str = ADDED_PROMPT
    negative_prompt: str = NEGATIVE_PROMPT
    seed: int = 0
    latent_tile: int = 320
    latent_overlap: int = 8
    tile_batch: int = 1
    blend: str = "gaussian"
    color_fix: str = "wavelet"
    # VAE tile side in image pixels: None = automatic (by image size and the device memory the
    # caller measured), 0 = untiled. Tiled and untiled results are equal up to float rounding.
    vae_tile: int | None = None
    # Latent pixels each pixel of the VAE's middle self-attention sees around it; 0 = all of
    # them (exact; its cost grows with the square of the image area).
    vae_attention_window: int = 0

    def __post_init__(self):
        checks = [
            (self.steps >= 1, "steps must be at least 1"),
            (self.scale > 0, "scale must be positive"),
            (self.process_size >= 8, "process size must be at least 8"),
            (0 <= self.added_noise_level < 1000, "added noise level must be in [0, 999]"),
            (self.conditioning_scale >= 0, "conditioning scale must not be negative"),
            (self.latent_tile >= 8, "latent tile must be at least 8"),
            (0 <= self.latent_overlap < self.latent_tile, "latent overlap must be in [0, latent tile)"),
            (self.tile_batch >= 1, "tile batch must be at least 1"),
            (self.blend in BLENDS, f"blend must be one of {', '.join(BLENDS)}"),
            (self.color_fix in COLOR_FIXES, f"color fix must be one of {', '.join(COLOR_FIXES)}"),
            (self.vae_tile is None or self.vae_tile == 0 or self.vae_tile >= MIN_VAE_TILE,
             f"VAE tile must be 0 (off) or at least {MIN_VAE_TILE} pixels"),
            (self.vae_attention_window >= 0, "VAE attention window must not be negative"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def uses_cfg(self) -> bool:
        return self.guidance > 1.0
