"""The VAE at Stable Diffusion 1.5 size, untiled: the stock networks (what `--exact` runs) against
row strips (engine.vae_strips, what the defaults run), side by side in one process.

    python benchmarks/bench_vae.py                    # 512x512, 3 alternating rounds
    python benchmarks/bench_vae.py --sizes 512 1024 --repeat 2
    python benchmarks/bench_vae.py --dtype bf16       # as --fast runs it on bf16 CPUs

The VAE is SD 1.5's architecture with random weights (seeded), float32 (or --dtype) on the CPU, with the
heap tuned as the command line tunes it (large blocks go back to the system when freed). Per
pass: seconds (median), and how far the peak RSS rises above the RSS before the pass (the
largest over the rounds; Linux only), each with its ratio to stock; and the strips' distance
from stock: the largest absolute difference, and for the decode the output's 8-bit levels.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VAE_CONFIG = ROOT / "pasd_cli" / "engine" / "configs" / "sd15" / "vae.json"


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _measure(run) -> tuple[float, int, torch.Tensor]:
    from pasd_cli.cli.runtime import peak_rss

    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # the peak RSS starts again from the current RSS
    before = _rss()
    started = time.perf_counter()
    out = run()
    return time.perf_counter() - started, peak_rss() - before, out


def _levels(decoded: torch.Tensor) -> torch.Tensor:
    return ((decoded / 2 + 0.5).clamp(0, 1) * 255).round()


def main() -> None:
    from diffusers import AutoencoderKL

    from pasd_cli.cli.runtime import limit_heap_fragmentation
    from pasd_cli.engine import vae_strips
    from pasd_cli.engine.vae import VaeCodec

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512], help="image sides in pixels")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; stock and strips alternate")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="the VAE's dtype")
    parser.add_argument("--strip-mb", type=float, help="bytes of a strip's input, in MiB (default: the engine's)")
    args = parser.parse_args()
    if args.strip_mb:
        vae_strips.STRIP_BYTES = int(args.strip_mb * 2**20)

    limit_heap_fragmentation()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    codec = VaeCodec(AutoencoderKL.from_config(json.loads(VAE_CONFIG.read_text())).eval().to(dtype))
    print(
        f"SD 1.5 VAE, random weights, {dtype}, cpu, {torch.get_num_threads()} threads, {args.repeat} rounds, "
        f"strips of {vae_strips.STRIP_BYTES / 2**20:g} MiB"
    )
    print("| pass | size | stock s | strips s | stock peak above start | strips peak above start | strips from stock |")
    print("|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for size in args.sizes:
            g = torch.Generator().manual_seed(size)
            image = torch.randint(0, 256, (1, 3, size, size), generator=g, dtype=torch.uint8)
            latents = codec.encode_moments(image)[0]  # warms up the kernels too
            codec.decode(latents)
            passes = {
                "encode": lambda strips, image=image: codec.encode_moments(image, strips=strips)[0],
                "decode": lambda strips, latents=latents: codec.decode(latents, strips=strips),
            }
            for name, run in passes.items():
                times: dict[bool, list[float]] = {False: [], True: []}
                peaks: dict[bool, int] = {False: 0, True: 0}
                outputs: dict[bool, torch.Tensor] = {}
                for round_ in range(args.repeat):
                    for strips in (False, True) if round_ % 2 == 0 else (True, False):
                        seconds, peak, outputs[strips] = _measure(lambda strips=strips, run=run: run(strips))
                        times[strips].append(seconds)
                        peaks[strips] = max(peaks[strips], peak)
                stock, strips = (statistics.median(times[k]) for k in (False, True))
                diff = f"max abs {(outputs[True] - outputs[False]).abs().max().item():.1e}"
                if name == "decode":
                    levels = (_levels(outputs[True]) - _levels(outputs[False])).abs()
                    diff += f", levels {levels.mean().item():.4f} / {levels.max().item():.0f}"
                stock_gb, strips_gb = peaks[False] / 2**30, peaks[True] / 2**30
                print(
                    f"| {name} | {size} | {stock:.1f} | {strips:.1f} ({strips / stock:.2f}x) "
                    f"| {stock_gb:.2f} GB | {strips_gb:.2f} GB ({strips_gb / stock_gb:.2f}x) | {diff} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
