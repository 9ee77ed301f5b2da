"""Time and peak memory of `pasd upscale` at growing output sizes, tiled and untiled.

Each configuration runs in a fresh process, so its peak resident memory (ru_maxrss) is its own;
on CUDA the peak allocated memory is reported too. Stage times (VAE encode, denoising, VAE
decode) come from wrapping the pipeline's methods in the child.

    python benchmarks/bench_tiling.py                       # tiny reference model on the CPU
    python benchmarks/bench_tiling.py --model sd --device cuda --dtype fp16 --steps 2
                                                            # SD-size networks, random weights

Modes: `tiled` (latent tiles + VAE tiles), `vae-untiled` (latent tiles, whole-image VAE),
`untiled` (neither); the untiled modes only up to the sizes given by --vae-untiled-up-to and
--untiled-up-to, beyond which they do not fit or take too long (the tiny UNet's attention cost
grows with the square of the latent area). At each size the baseline mode (--baseline, default
`untiled`) runs first where it fits, and the other rows give their time and peak RSS as ratios
to it (`x time`, `x RSS`).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "fixtures" / "reference" / "tiny-pasd"
TINY_PASD = REFERENCE / "pasd" / "checkpoint-100000"
TINY_BASE = REFERENCE / "stable-diffusion-v1-5"
SD15 = ROOT / "tests" / "fixtures" / "sd15"


def lr_image(side: int):
    """A smooth colour gradient with a soft texture: something for the colour fix to keep."""
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:side, 0:side] / side
    texture = 0.08 * np.sin(40 * xx) * np.sin(33 * yy)
    rgb = np.stack([xx, yy, 0.5 * (xx + yy)], -1) * 0.8 + 0.1 + texture[..., None]
    return Image.fromarray((rgb.clip(0, 1) * 255).astype(np.uint8))


def sd_components():
    """SD 1.5-size PASD networks, VAE and text encoder with random weights (for timing only)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from pasd_cli.engine.loading import Components
    from pasd_cli.nn.loading import build_pasd_controlnet, build_pasd_unet

    unet = build_pasd_unet(json.loads((SD15 / "unet_config.json").read_text()), "full")
    controlnet = build_pasd_controlnet(json.loads((SD15 / "controlnet_config.json").read_text()), 0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
        )
    )
    tokenizer = CLIPTokenizer.from_pretrained(str(TINY_BASE / "tokenizer"))  # its ids fit SD's vocabulary
    scheduler = json.loads((TINY_BASE / "scheduler" / "scheduler_config.json").read_text())
    for model in (unet, controlnet, vae, text_encoder):
        model.eval().requires_grad_(False)
    return Components(unet, controlnet, vae, text_encoder, tokenizer, scheduler)


def child(config: dict) -> dict:
    import torch

    from pasd_cli.cli.runtime import limit_heap_fragmentation
    from pasd_cli.engine import UpscaleSettings
    from pasd_cli.engine.pipeline import PASDPipeline

    limit_heap_fragmentation()  # as the CLI does
    device = torch.device(config["device"])
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config["dtype"]]
    if config["model"] == "sd":
        pipeline = PASDPipeline(sd_components(), device, dtype)
    else:
        pipeline = PASDPipeline.from_folders(TINY_PASD, TINY_BASE, device, dtype)
    pipeline.memory_budget = config["vae_memory"] * 2**20 if config["vae_memory"] else None
    settings = UpscaleSettings(
        steps=config["steps"],
        guidance=config["guidance"],
        scale=4,
        process_size=64,
        latent_tile=config["latent_tile"],
        latent_overlap=config["latent_overlap"],
        tile_batch=config["tile_batch"],
        blend="ramp",
        vae_tile=config["vae_tile"],
        vae_attention_window=config["attention_window"],
    )
    stages: dict[str, float] = {}

    def timed(name, method):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                stages[name] = stages.get(name, 0.0) + time.perf_counter() - start

        return wrapper

    pipeline.initial_latents = timed("encode", pipeline.initial_latents)
    pipeline.denoise = timed("denoise", pipeline.denoise)
    pipeline.vae.decode = timed("decode", pipeline.vae.decode)
    image = lr_image(config["size"] // 4)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = pipeline.upscale(image, settings)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "stages": stages,
        "size": result.image.size,
        "latent_tiles": result.latent_tiles,
        "vae_tile": result.vae_tile,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_after_load": base_rss,
        "cuda_peak": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
    }


def output_array_bytes(side: int) -> int:
    """The arrays that grow with the output and are meant to: the decoded float image, and the
    uint8 hint, result, colour-fixed result and final PIL image."""
    pixels = side * side
    return pixels * 3 * 4 + 4 * pixels * 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="1024,2048,4096,8192", help="output sides in pixels")
    parser.add_argument("--model", choices=("tiny", "sd"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--latent-tile", type=int, default=32)
    parser.add_argument("--latent-overlap", type=int, default=8)
    parser.add_argument("--tile-batch", type=int, default=4)
    parser.add_argument("--vae-tile", type=int, default=None, help="pixels; default: automatic from --vae-memory")
    parser.add_argument(
        "--vae-memory",
        type=int,
        default=1024,
        help="MB for the automatic VAE choice; 0: none "
        "(then --vae-tile must be given, and no whole-image checkpoints are kept)",
    )
    parser.add_argument(
        "--attention-window",
        default="4096:64",
        help="VAE attention window: 'SIZE:WINDOW' uses WINDOW from output SIZE up, else exact",
    )
    parser.add_argument("--untiled-up-to", type=int, default=1024)
    parser.add_argument("--vae-untiled-up-to", type=int, default=2048)
    parser.add_argument("--modes", default="tiled,vae-untiled,untiled")
    parser.add_argument("--baseline", default="untiled", help="the mode the others are compared with")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return

    from_size, window = (int(v) for v in args.attention_window.split(":"))
    rows = []
    print(
        f"model {args.model}, {args.device} {args.dtype}, {args.steps} step(s), guidance {args.guidance}, "
        f"latent tile {args.latent_tile}/{args.latent_overlap} (ramp, batch {args.tile_batch}), "
        f"VAE {'tile ' + str(args.vae_tile) if args.vae_tile else 'auto'}, VAE memory {args.vae_memory} MB, "
        f"VAE attention window {window} from {from_size} px",
        flush=True,
    )
    header = (
        f"{'size':>5} {'mode':<11} {'tiles':>5} {'vae':>5} {'s':>8} {'s/MP':>6} {'x time':>6} {'enc':>7} "
        f"{'denoise':>8} {'dec':>7} {'peak RSS':>9} {'x RSS':>5} {'+load':>7} {'CUDA':>8} {'outputs':>8}"
    )
    print(header, flush=True)
    modes = args.modes.split(",")
    modes.sort(key=lambda mode: mode != args.baseline)  # the baseline first, the rest in the given order
    for size in (int(s) for s in args.sizes.split(",")):
        baseline = None
        for mode in modes:
            limit = {"tiled": math.inf, "vae-untiled": args.vae_untiled_up_to, "untiled": args.untiled_up_to}[mode]
            if size > limit:
                continue
            config = {
                "size": size,
                "model": args.model,
                "device": args.device,
                "dtype": args.dtype,
                "steps": args.steps,
                "guidance": args.guidance,
                "tile_batch": args.tile_batch,
                "latent_tile": args.latent_tile if mode != "untiled" else size // 8,
                "latent_overlap": args.latent_overlap,
                "vae_tile": 0 if mode != "tiled" else args.vae_tile,
                "vae_memory": args.vae_memory if mode == "tiled" else 0,
                "attention_window": window if size >= from_size else 0,
            }
            proc = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(config)], capture_output=True, text=True, cwd=ROOT
            )
            if proc.returncode != 0:
                print(f"{size:>5} {mode:<11} failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            row = {**config, "mode": mode, **json.loads(proc.stdout.strip().splitlines()[-1])}
            rows.append(row)
            if mode == args.baseline:
                baseline = row
            ratio = lambda key, row=row, baseline=baseline: (  # noqa: E731
                f"{row[key] / baseline[key]:.2f}" if baseline else "-"
            )
            mp = size * size / 1e6
            gb = lambda b: f"{b / 2**30:.2f}G" if b is not None else "-"  # noqa: E731
            stage = lambda name, row=row: f"{row['stages'].get(name, 0):.1f}"  # noqa: E731
            print(
                f"{size:>5} {mode:<11} {row['latent_tiles']:>5} {row['vae_tile'] or 'off':>5} {row['seconds']:>8.1f} "
                f"{row['seconds'] / mp:>6.1f} {ratio('seconds'):>6} {stage('encode'):>7} {stage('denoise'):>8} "
                f"{stage('decode'):>7} {gb(row['peak_rss']):>9} {ratio('peak_rss'):>5} {gb(row['rss_after_load']):>7} "
                f"{gb(row['cuda_peak']):>8} {gb(output_array_bytes(size)):>8}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
