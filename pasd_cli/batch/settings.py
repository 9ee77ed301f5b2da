"""Defaults of the command line that are not the engine's: model names, batch options, limits.
The engine's settings live in `engine/settings.py` and are re-exported here."""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.settings import (  # noqa: F401  (re-exported for the CLI)
    ADDED_PROMPT,
    BASE_BLEND,
    BLENDS,
    CAPTION_MODES,
    COLOR_FIXES,
    FAST_GUIDANCE,
    FAST_STEPS,
    MIN_VAE_TILE,
    NEGATIVE_PROMPT,
    CaptionSettings,
    LoraSpec,
    StylizeSettings,
    UpscaleSettings,
    _require,
)

# Model names from models/*.json that `pasd upscale` uses, and `pasd download` fetches, by default.
PASD_MODEL = "pasd"
BASE_MODEL = "sd15"
# Without --vae-memory, a VAE pass may use this share of the device's free memory (measured once
# the models are loaded); the rest is headroom for the diffusion and other programs.
VAE_MEMORY_SHARE = 0.5


# Model names from models/*.json that --caption blip and --caption classify use by default;
# `pasd download` fetches the captioner with the default PASD model, as upscale captions by default.
CAPTION_MODEL = "blip"
CLASSIFY_MODEL = "resnet-50"

# Batch and output options, shared by every command that runs a model over many images.
OUTPUT_FORMATS = ("png", "jpg", "webp", "tiff", "same")
ON_EXISTS = ("skip", "overwrite", "error")
DEFAULT_QUALITY = {"jpg": 95, "webp": 95}
# Larger inputs are refused from their header alone, before any decoding. 64 MP is far above
# what a diffusion upscaler can enlarge usefully, and below Pillow's own decompression-bomb guard.
MAX_INPUT_PIXELS = 64_000_000


@dataclass(frozen=True)
class BatchSettings:
    inputs: tuple[str, ...] = ()
    output: str = ""  # a folder, or "-" for stdout
    recursive: bool = False
    name: str = "{stem}"
    format: str = "png"
    quality: int | None = None
    on_exists: str = "skip"
    retry_failed: bool = False
    fail_fast: bool = False
    json: bool = False
    dry_run: bool = False
    verbosity: int = 1  # 0 quiet, 1 normal, 2 verbose
    lock: str | None = None

    def __post_init__(self):
        _require(
            [
                (self.format in OUTPUT_FORMATS, f"format must be one of {', '.join(OUTPUT_FORMATS)}"),
                (self.on_exists in ON_EXISTS, f"--on-exists must be one of {', '.join(ON_EXISTS)}"),
                (self.quality is None or 1 <= self.quality <= 100, "quality must be in [1, 100]"),
                (self.inputs.count("-") <= 1, "'-' (paths from stdin) may be given once"),
                (
                    not (self.to_stdout and self.json),
                    "-o - writes the image to stdout; it cannot be combined with --json",
                ),
                (not (self.to_stdout and self.recursive), "-o - writes one image; --recursive makes no sense with it"),
                (self.name.strip() != "", "--name must not be empty"),
            ]
        )

    @property
    def to_stdout(self) -> bool:
        return self.output == "-"


# Stylization's default PASD model: the authors advise the light variant.
STYLIZE_PASD = "pasd-light"
# --fast: the LCM-LoRA with the LCM scheduler; its authors advise 4-8 steps and guidance 1-2.
LCM_LORA = "lcm-lora-sdv1-5"
