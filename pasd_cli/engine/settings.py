"""The engine's settings: frozen dataclasses with their defaults (the released script's) and
their bounds. Callers (the CLI, a Python script) build them; the engine only reads them."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

# The released script's defaults (spec section 4); only the output scale differs (4, not 1).
ADDED_PROMPT = "clean, high-resolution, 8k"
NEGATIVE_PROMPT = "blurry, dotted, noise, raster lines, unclear, lowres, over-smoothed"
COLOR_FIXES = ("wavelet", "adain", "none")
BLENDS = ("gaussian", "ramp")
MIN_VAE_TILE = 64
# SD 1.5's schedule has 1000 timesteps; from 1000 steps on, UniPC's schedule repeats one (a
# rounding of its spacing), divides by the zero step between them and the image turns black.
MAX_STEPS = 999
# Beyond 16x a diffusion upscaler invents more than it restores; the pixel limit of a batch
# (batch/sizes.py) bounds what a scale costs.
MAX_SCALE = 16

# The released script's tiling: tiles of 320 latents overlapping by 8, blended with its
# Gaussian (which leaves a step where neighbouring Gaussians cross, see tests/test_seams.py).
RELEASED_LATENT_TILE = 320
RELEASED_LATENT_OVERLAP = 8
RELEASED_BLEND = "gaussian"
# The smallest tile the automatic tiling cuts (engine.tiling.auto_tiling): the training size.
MIN_AUTO_TILE = 64
# What the automatic choices give outside exact mode: the ramp blend cross-fades over the whole
# overlap, so the many tiles of the automatic tiling leave no seam.
DEFAULT_BLEND = "ramp"
# How a caption meets the added prompt. The released code puts nothing between them ("a
# dogclean, high-resolution, 8k"), which exact mode keeps.
CAPTION_SEPARATOR = ", "
# Exact mode computes in float32, as the released script's parity runs did; the engine takes
# the dtype from its caller, who loads the pipeline in this one.
EXACT_DTYPE = "float32"


def _require(checks: list[tuple[bool, str]]) -> None:
    """Raise ValueError with the message of the first failed check."""
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


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
    # Latent tiling. None: automatic (engine.tiling.auto_tiling picks tile and overlap by cost;
    # with a given tile, the released overlap). A given tile is tiled as released.
    latent_tile: int | None = None
    latent_overlap: int | None = None
    # Latent tiles per denoiser pass; None: automatic (engine.tile_batch: by memory on CUDA,
    # else one). A batch gives the same result up to float rounding.
    tile_batch: int | None = None
    blend: str | None = None  # None: ramp (gaussian in exact mode)
    color_fix: str = "wavelet"
    # VAE tile side in image pixels: None = automatic (by image size and the device memory the
    # caller measured), 0 = untiled. Tiled and untiled results are equal up to float rounding.
    vae_tile: int | None = None
    # Latent pixels each pixel of the VAE's middle self-attention sees around it; 0 = all of
    # them (exact; its cost grows with the square of the image area); None = automatic (see
    # engine.vae.auto_attention_window: a window only where global attention would dominate).
    vae_attention_window: int | None = None
    # The released script's computation (with the pipeline in EXACT_DTYPE): automatic fields
    # take the released values (tiles of 320/8 blended with its Gaussian, global VAE attention)
    # and the released prompt quirks are kept. Fields given explicitly are kept as given.
    exact: bool = False

    def __post_init__(self):
        if self.exact:
            released = {
                "latent_tile": RELEASED_LATENT_TILE,
                "latent_overlap": RELEASED_LATENT_OVERLAP,
                "blend": RELEASED_BLEND,
                "vae_attention_window": 0,
                "tile_batch": 1,
            }
            for name, value in released.items():
                if getattr(self, name) is None:
                    object.__setattr__(self, name, value)
        tile, overlap = self.latent_tile, self.latent_overlap
        _require(
            [
                *(
                    (math.isfinite(getattr(self, name)), f"{name.replace('_', ' ')} must be a finite number")
                    for name in ("guidance", "conditioning_scale", "scale")
                ),
                (self.steps >= 1, "steps must be at least 1"),
                (self.steps <= MAX_STEPS, f"steps must be at most {MAX_STEPS} (the schedule has 1000 timesteps)"),
                # What torch.Generator.manual_seed accepts; beyond it every image would fail alike.
                (-(2**63) <= self.seed < 2**64, "seed must fit in 64 bits"),
                (self.scale > 0, "scale must be positive"),
                (self.process_size >= 8, "process size must be at least 8"),
                (0 <= self.added_noise_level < 1000, "added noise level must be in [0, 999]"),
                (self.conditioning_scale >= 0, "conditioning scale must not be negative"),
                (tile is None or tile >= 8, "latent tile must be at least 8"),
                (overlap is None or overlap >= 0, "latent overlap must not be negative"),
                (
                    (RELEASED_LATENT_OVERLAP if overlap is None else overlap) < (tile or MIN_AUTO_TILE),
                    "latent overlap must be in [0, latent tile)",  # an automatic tile is at least MIN_AUTO_TILE
                ),
                (self.tile_batch is None or self.tile_batch >= 1, "tile batch must be at least 1"),
                (self.scale <= MAX_SCALE, f"scale must be at most {MAX_SCALE}"),
                (self.blend is None or self.blend in BLENDS, f"blend must be one of {', '.join(BLENDS)}"),
                (self.color_fix in COLOR_FIXES, f"color fix must be one of {', '.join(COLOR_FIXES)}"),
                (
                    self.vae_tile is None or self.vae_tile == 0 or self.vae_tile >= MIN_VAE_TILE,
                    f"VAE tile must be 0 (off) or at least {MIN_VAE_TILE} pixels",
                ),
                (
                    self.vae_attention_window is None or self.vae_attention_window >= 0,
                    "VAE attention window must not be negative",
                ),
            ]
        )

    @property
    def uses_cfg(self) -> bool:
        return self.guidance > 1.0

    @property
    def caption_separator(self) -> str:
        return "" if self.exact else CAPTION_SEPARATOR

    @property
    def latent_blend(self) -> str:
        return self.blend or (RELEASED_BLEND if self.exact else DEFAULT_BLEND)


def exact_settings(settings: UpscaleSettings | None = None) -> UpscaleSettings:
    """`settings` (default: upscaling's) in exact mode: see `UpscaleSettings.exact`."""
    return replace(settings if settings is not None else UpscaleSettings(), exact=True)


# High-level information for the prompt (spec section 5): a BLIP caption (released default:
# caption), an ImageNet class (classify) or nothing (none).
CAPTION_MODES = ("blip", "classify", "none")


@dataclass(frozen=True)
class CaptionSettings:
    mode: str = "blip"
    # BLIP as the released BLIP path runs it (LAVIS blip_caption, base_coco): the decoder is
    # primed with "a picture of " and that prefix is cut from the caption; beam search with 3
    # beams, 10 to 30 tokens counting the prefix. Deterministic: no sampling.
    blip_prefix: str = "a picture of"
    num_beams: int = 3
    min_length: int = 10
    max_length: int = 30
    # The released classify rule: the top-1 ImageNet class when its probability is >= 0.1.
    min_probability: float = 0.1

    def __post_init__(self):
        _require(
            [
                (self.mode in CAPTION_MODES, f"caption must be one of {', '.join(CAPTION_MODES)}"),
                (self.num_beams >= 1, "caption beams must be at least 1"),
                (1 <= self.min_length <= self.max_length, "caption lengths must satisfy 1 <= min <= max"),
                (0.0 <= self.min_probability <= 1.0, "classify probability must be in [0, 1]"),
            ]
        )


# Stylization (spec section 6): the SR model on a personalized SD 1.5 base. The authors advise
# the light variant, conditioning scale 0.7 (smaller = more stylized) and no enlargement.
BASE_BLEND = 1.0  # weight of a full checkpoint's stock UNet against the PASD file's (1: replace)
# --fast: the LCM-LoRA with the LCM scheduler; its authors advise 4-8 steps and guidance 1-2.
FAST_STEPS = 4
FAST_GUIDANCE = 1.0
# The LCM scheduler's original schedule has 50 steps; it refuses more.
FAST_MAX_STEPS = 50


@dataclass(frozen=True)
class StylizeSettings(UpscaleSettings):
    conditioning_scale: float = 0.7
    scale: float = 1.0


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA: its file and the weight it is merged at (FILE or FILE:WEIGHT as text)."""

    path: str
    weight: float = 1.0

    def __post_init__(self):
        if not self.path:
            raise ValueError("a LoRA needs a file")
        if not math.isfinite(self.weight):
            raise ValueError(f"LoRA weight must be a finite number, got {self.weight}")

    @classmethod
    def parse(cls, text: str, exists=os.path.exists) -> LoraSpec:
        """FILE or FILE:WEIGHT. The weight is whatever follows the LAST colon, and only when it
        reads as a number and the text as a whole is not an existing file, so Windows paths
        (C:\\loras\\x.safetensors) and names with colons stay intact."""
        head, sep, tail = text.rpartition(":")
        if not sep or not head or exists(text):
            return cls(text)
        try:
            weight = float(tail)
        except ValueError:
            if exists(head):  # FILE:abc names an existing file: the weight is what is wrong
                raise ValueError(
                    f"{text}: the weight {tail!r} is not a number (FILE:WEIGHT, e.g. {head}:0.8)"
                ) from None
            return cls(text)
        return cls(head, weight)


# Colorization (spec section 7): the released fixed negative prompt, and how the luma is merged.
COLOR_NEGATIVE_PROMPT = "b&w, color bleeding"
LUMA_MODES = ("exact", "released")


@dataclass(frozen=True)
class ColorizeSettings(UpscaleSettings):
    """The shared settings with colorization's defaults (the released script's), plus `luma`:
    "exact" keeps the input's luma (a colour that would leave the RGB cube loses saturation
    instead), "released" is the released merge, which clips and so moves the luma.

    `added_prompt` is empty as released (it is appended before the word replacement);
    `negative_prompt` is the released fixed one. The output keeps the input's size and gets no
    colour fix, so `scale` must stay 1 and `color_fix` "none"."""

    scale: float = 1.0
    added_prompt: str = ""
    negative_prompt: str = COLOR_NEGATIVE_PROMPT
    color_fix: str = "none"
    luma: str = "exact"

    def __post_init__(self):
        super().__post_init__()
        if self.luma not in LUMA_MODES:
            raise ValueError(f"luma must be one of {', '.join(LUMA_MODES)}")
        if self.scale != 1:
            raise ValueError("colorization keeps the input size: scale must be 1")
        if self.color_fix != "none":
            raise ValueError("colorization takes no colour fix: it would pull the colours back to grey")
