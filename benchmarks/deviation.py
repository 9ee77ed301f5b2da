"""How far the default mode's images are from exact mode's (the released computation), in
8-bit levels, on the tiny test models (full PASD and PASD-light).

    python benchmarks/deviation.py                 # fp32 and bf16, 512 and 1024 px outputs
    python benchmarks/deviation.py --sizes 1024 --dtypes fp32 --steps 20

Each row: the same input, seed and prompt made twice, once with `exact_settings(...)` in
float32 and once with the defaults (`UpscaleSettings()`: automatic latent tiling with the ramp
blend, automatic VAE attention window) in the given dtype; the mean and the largest absolute
difference of the output pixels. Where the defaults change nothing the row reads 0 / 0.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "reference" / "tiny-pasd"
MODELS = {
    "pasd": TINY / "pasd" / "checkpoint-100000",
    "pasd_light": TINY / "pasd_light" / "checkpoint-120000",
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def lr_image(side: int) -> Image.Image:
    """A colour gradient with texture, so tiles see different content."""
    yy, xx = np.mgrid[0:side, 0:side] / side
    texture = 0.08 * np.sin(40 * xx) * np.sin(33 * yy)
    rgb = np.stack([xx, yy, 0.5 * (xx + yy)], -1) * 0.8 + 0.1 + texture[..., None]
    return Image.fromarray((rgb.clip(0, 1) * 255).astype(np.uint8))


def main() -> None:
    from pasd_cli.engine import UpscaleSettings, exact_settings
    from pasd_cli.engine.pipeline import PASDPipeline

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="output sides in pixels")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--models", nargs="+", default=sorted(MODELS), choices=sorted(MODELS))
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()

    print("| model | output | dtype | latent tiles (default / exact) | mean levels | max levels | seconds |")
    print("|---|---|---|---|---|---|---|")
    for model in args.models:
        # One pipeline per dtype: a cast down and back would not restore the fp32 weights.
        pipelines = {
            name: PASDPipeline.from_folders(MODELS[model], TINY / "stable-diffusion-v1-5", torch.device("cpu"), dtype)
            for name, dtype in DTYPES.items()
            if name == "fp32" or name in args.dtypes
        }
        for size in args.sizes:
            settings = UpscaleSettings(steps=args.steps, scale=4, process_size=64, seed=7, prompt="a test image")
            image = lr_image(size // 4)
            exact = pipelines["fp32"].upscale(image, exact_settings(settings))
            for name in args.dtypes:
                pipeline = pipelines[name]
                started = time.monotonic()
                default = pipeline.upscale(image, settings)
                seconds = time.monotonic() - started
                diff = np.abs(np.asarray(default.image, np.int16) - np.asarray(exact.image, np.int16))
                print(
                    f"| {model} | {size}x{size} | {name} | {default.latent_tiles} / {exact.latent_tiles} "
                    f"| {diff.mean():.2f} | {diff.max()} | {seconds:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
