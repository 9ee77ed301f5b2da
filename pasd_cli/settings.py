"""Every option's default, in one place. Frozen dataclasses passed from the CLI to the engine."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

# The released script's defaults (spec section 4); only the output scale differs (4, not 1).
ADDED_PROMPT = "clean, high-resolution, 8k"
NEGATIVE_PROMPT = "blurry, dotted, noise, raster lines, unclear, lowres, over-smoothed"
COLOR_FIXES = ("wavelet", "adain", "none")
BLENDS = ("gaussian", "ramp")


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
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def uses_cfg(self) -> bool:
        return self.guidance > 1.0


# Stylization (spec section 6): the SR model on a personalized SD 1.5 base. The authors advise
# the light variant, conditioning scale 0.7 (smaller = more stylized) and no enlargement.
STYLIZE_PASD = "pasd-light"
BASE_BLEND = 1.0  # weight of a full checkpoint's stock UNet against the PASD file's (1: replace)
# --fast: the LCM-LoRA with the LCM scheduler; its authors advise 4-8 steps and guidance 1-2.
LCM_LORA = "lcm-lora-sdv1-5"
FAST_STEPS = 4
FAST_GUIDANCE = 1.0


@dataclass(frozen=True)
class StylizeSettings(UpscaleSettings):
    conditioning_scale: float = 0.7
    scale: float = 1.0


@dataclass(frozen=True)
class LoraSpec:
    """One `--lora FILE[:WEIGHT]`."""

    path: str
    weight: float = 1.0

    def __post_init__(self):
        if not self.path:
            raise ValueError("--lora needs a file")
        if not math.isfinite(self.weight):
            raise ValueError(f"LoRA weight must be a finite number, got {self.weight}")

    @classmethod
    def parse(cls, text: str, exists=os.path.exists) -> "LoraSpec":
        """FILE or FILE:WEIGHT. The weight is whatever follows the LAST colon, and only when it
        reads as a number and the text as a whole is not an existing file, so Windows paths
        (C:\\loras\\x.safetensors) and names with colons stay intact."""
        head, sep, tail = text.rpartition(":")
        if not sep or not head or exists(text):
            return cls(text)
        try:
            weight = float(tail)
        except ValueError:
            return cls(text)
        return cls(head, weight)
