"""What the scale-out tests share: a folder of small photos, the tiny model's options, and how
to read outputs and records back."""

from __future__ import annotations

import json
import signal
import socket
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_model_args
from PIL import Image

MODEL = [*tiny_model_args(), "--device", "cpu", "--dtype", "fp32", "--caption", "none"]
FAST = ["--scale", "2", "--steps", "1", "--guidance", "1", "--process-size", "16"]


def make_photos(folder: Path, count: int, size: int = 16, seed: int = 0) -> list[Path]:
    """`count` different noisy photos; a diffusion model turns each into a different output."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        pixels = rng.integers(0, 256, (size, size + index % 3, 3), dtype=np.uint8)
        path = folder / f"photo{index:02d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def outputs(folder: Path) -> dict[str, np.ndarray]:
    """Every image written to `folder`, decoded (hidden files are not outputs)."""
    return {p.name: pixels(p) for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


def records(stdout: str) -> tuple[list[dict], list[dict]]:
    """The image records and the summaries of --json output."""
    objects = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return [o for o in objects if o["type"] == "image"], [o for o in objects if o["type"] == "summary"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pasd_here(capfd, *args) -> tuple[int, str, str]:
    """`pasd ARGS` in this process: exit code, stdout, stderr."""
    from pasd_cli.cli import main

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    capfd.readouterr()
    try:
        with pytest.raises(SystemExit) as info:
            main([str(a) for a in args])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    out, err = capfd.readouterr()
    return info.value.code or 0, out, err
