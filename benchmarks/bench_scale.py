"""Images per second of `pasd upscale` over one folder with 1 worker and with W workers
(`--shard I/W`, started together, one thread each), and the ratio: how one folder scales over
processes on this machine. The tiny reference model on the CPU, so it runs anywhere.

    python benchmarks/bench_scale.py                          # 1 and 2 workers, 96 images
    python benchmarks/bench_scale.py --workers 4 --images 64 --repeat 3

Two rates per run: end to end (start of the processes to the last exit: imports and model
loading included), and at work (from each worker's first record to its last, over the images
in between: what a long batch sees). Each worker gets one thread (OMP_NUM_THREADS=1), so
W workers need W free cores; check `uptime` first.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "fixtures" / "reference" / "tiny-pasd"
MODEL = ["--pasd", str(TINY / "pasd" / "checkpoint-100000"), "--base", str(TINY / "stable-diffusion-v1-5")]
SETTINGS = ["--device", "cpu", "--dtype", "fp32", "--caption", "none", "--scale", "2", "--guidance", "1"]


def make_folder(folder: Path, count: int, size: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"img{index:04d}.png")


def run(folder: Path, out: Path, workers: int, extra: list[str]) -> tuple[float, float, int]:
    """(end-to-end images/s, at-work images/s, images done) for `workers` shards started together."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "pasd_cli", "upscale", str(folder), "-o", str(out), *MODEL, *SETTINGS, *extra]
    commands = [base + (["--shard", f"{i}/{workers}"] if workers > 1 else []) for i in range(workers)]
    arrivals: list[list[float]] = [[] for _ in commands]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env) for cmd in commands
    ]

    def read(index: int) -> None:
        stream = procs[index].stdout
        assert stream is not None
        for _ in stream:  # one output path a line, as each image is done
            arrivals[index].append(time.perf_counter())

    readers = [threading.Thread(target=read, args=(i,)) for i in range(workers)]
    for reader in readers:
        reader.start()
    for proc in procs:
        if proc.wait() != 0:
            raise SystemExit(f"a worker failed: {' '.join(proc.args)}")
    end = time.perf_counter()
    for reader in readers:
        reader.join()
    done = sum(len(a) for a in arrivals)
    # At work: the images after each worker's first, over the span from the earliest first
    # record to the latest last one.
    first, last = min(a[0] for a in arrivals if a), max(a[-1] for a in arrivals if a)
    at_work = (done - sum(1 for a in arrivals if a)) / (last - first) if last > first else float("nan")
    return done / (end - start), at_work, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="compared against 1 worker")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--size", type=int, default=32, help="input side in pixels")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--process-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    extra = ["--steps", str(args.steps), "--process-size", str(args.process_size)]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.images} images {args.size}x{args.size}, steps {args.steps}, {os.cpu_count()} cores, load {load:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        make_folder(folder, args.images, args.size)
        best: dict[int, tuple[float, float]] = {}
        for repeat in range(args.repeat):
            for workers in (1, args.workers):
                out = Path(tmp) / f"out-{workers}-{repeat}"
                end_to_end, at_work, done = run(folder, out, workers, extra)
                assert done == args.images, f"{done} of {args.images} images done"
                rates = f"{end_to_end:6.3f} images/s end to end, {at_work:6.3f} at work"
                print(f"run {repeat + 1}, {workers} worker(s): {rates}", flush=True)
                old = best.get(workers, (0.0, 0.0))
                best[workers] = (max(old[0], end_to_end), max(old[1], at_work))
    one, many = best[1], best[args.workers]
    print(f"best of {args.repeat}: 1 worker {one[0]:.3f} / {one[1]:.3f} images/s (end to end / at work)")
    print(f"best of {args.repeat}: {args.workers} workers {many[0]:.3f} / {many[1]:.3f} images/s")
    print(f"ratio {args.workers} workers / 1: {many[0] / one[0]:.2f}x end to end, {many[1] / one[1]:.2f}x at work")


if __name__ == "__main__":
    main()
