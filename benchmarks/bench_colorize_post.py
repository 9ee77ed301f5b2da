"""Time and peak memory of colorization's post-processing on a large image, beside baselines
run in the same process: the OpenCV-exact bilinear resize against Pillow's C bilinear resize,
the exact-luma merge against the released merge, and the grey/colour test.

    python benchmarks/bench_colorize_post.py                 # 4000x3000 output from 1024x768
    python benchmarks/bench_colorize_post.py --size 6000 4000 --repeat 3

Peak memory is numpy's allocations during the call (tracemalloc), as a multiple of the output
RGB image's bytes (W*H*3).
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np
from PIL import Image

from pasd_cli.engine.grayscale import is_grayscale
from pasd_cli.engine.linear_resize import resize_linear
from pasd_cli.engine.yuv import exact_merge, released_merge


def measure(call, repeat: int) -> tuple[float, int]:
    """(best seconds, peak traced bytes)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    tracemalloc.start()
    call()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return best, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=(4000, 3000), metavar=("W", "H"))
    parser.add_argument("--source", type=int, nargs=2, default=(1024, 768), metavar=("W", "H"))
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    width, height = args.size
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (args.source[1], args.source[0], 3), dtype=np.uint8)
    color = resize_linear(source, (width, height))
    gray = rng.integers(0, 256, (height, width), dtype=np.uint8)
    luma16 = gray.astype(np.uint16) * 257
    image_bytes = width * height * 3
    rows = [
        ("resize: Pillow BILINEAR (baseline)", lambda: Image.fromarray(source).resize((width, height), Image.BILINEAR)),
        ("resize: resize_linear (OpenCV-exact)", lambda: resize_linear(source, (width, height))),
        ("merge: released (baseline)", lambda: released_merge(gray, color)),
        ("merge: exact luma, 8-bit", lambda: exact_merge(gray, color)),
        ("merge: exact luma, 16-bit", lambda: exact_merge(luma16, color, 65535)),
        ("grey test: is_grayscale, colour input", lambda: is_grayscale(color)),
    ]
    print(f"output {width}x{height}, pipeline output {args.source[0]}x{args.source[1]}, best of {args.repeat}")
    baselines: dict[str, float] = {}
    for name, call in rows:
        seconds, peak = measure(call, args.repeat)
        group = name.split(":")[0]
        if "baseline" in name:
            baselines[group] = seconds
        ratio = f"{seconds / baselines[group]:5.2f}x of baseline" if group in baselines else " " * 17
        print(f"{name:40s} {seconds:7.3f} s  {ratio}  peak {peak / image_bytes:5.2f}x image")


if __name__ == "__main__":
    main()
