"""Shared fixtures: the tiny reference model (copied from the released implementation's parity
bundle) and a runner for the real `pasd` command."""

from __future__ import annotations

import os

# Tiny models: one thread each is faster than two fighting over a busy machine, and the
# subprocesses that tests start inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import atexit
import contextlib
import io
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# What commands keep in the model store (weights converted at load) goes to a store of the test
# run's own, not the user's cache; tests of the store name theirs.
if "PASD_HOME" not in os.environ:
    os.environ["PASD_HOME"] = tempfile.mkdtemp(prefix="pasd-tests-store-")
    atexit.register(shutil.rmtree, os.environ["PASD_HOME"], ignore_errors=True)

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = FIXTURES / "reference"
TINY = REFERENCE / "tiny-pasd"
TINY_PASD = TINY / "pasd" / "checkpoint-100000"
TINY_LIGHT = TINY / "pasd_light" / "checkpoint-120000"
TINY_BASE = TINY / "stable-diffusion-v1-5"
LR_INPUT = REFERENCE / "lr_input.png"

# The reference pipeline run (reference README, section C); it had no prompt from the image.
REFERENCE_ARGS = [
    "--exact",
    "--steps",
    "2",
    "--scale",
    "2",
    "--process-size",
    "112",
    "--prompt",
    "a tiny test image",
    "--seed",
    "1234",
    "--guidance",
    "9",
    "--conditioning-scale",
    "1",
    "--dtype",
    "fp32",
    "--device",
    "cpu",
    "--caption",
    "none",
]


def pasd_command() -> list[str]:
    script = Path(sys.executable).with_name("pasd")
    if script.exists():
        return [str(script)]
    found = shutil.which("pasd")
    return [found] if found else [sys.executable, "-m", "pasd_cli"]


def run_pasd(*args: str, timeout: float = 300, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [*pasd_command(), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        stdin=subprocess.DEVNULL,
        **kwargs,
    )


def _put_the_allocator_back() -> None:
    """The command line fixes glibc's mmap threshold at 4 MB and trims the heap from a thread
    once a second (cli/runtime.py). Left in this process, every later test's large tensors would
    be fresh pages: a tiny-VAE test took 27-30 s instead of 16. glibc's own thresholds rise with
    use to 32 MB (mmap) and twice that (trim); that is what is put back (once set, they no longer
    move by themselves)."""
    from pasd_cli.cli import runtime

    runtime.stop_heap_trimming()
    libc = runtime._libc()
    if libc is not None:
        libc.mallopt(runtime._M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(runtime._M_TRIM_THRESHOLD, 64 << 20)


def pasd_here(
    *args: object, env: dict[str, str] | None = None, cwd: Path | None = None, text: bool = True
) -> subprocess.CompletedProcess:
    """`pasd ARGS` run by `main` in this process, answered as `run_pasd` answers: no interpreter
    start and no second import of torch and diffusers (about 6 s a run here). For runs whose
    subject is not the process itself (its imports, signals, terminal, stdin or a hub endpoint
    that libraries read once at import). What `main` changes in the process (the environment,
    the signal handlers, the working folder, the allocator's settings) is put back
    afterwards."""
    from pasd_cli.cli.app import main

    out, err = (io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True) for _ in range(2))
    environ = dict(os.environ)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    here = Path.cwd()
    code: object = 0
    try:
        os.environ.update(env or {})
        os.chdir(cwd or here)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(a) for a in args])
            except SystemExit as exc:
                code = exc.code
    finally:
        os.chdir(here)
        os.environ.clear()
        os.environ.update(environ)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        _put_the_allocator_back()
    stdout, stderr = (stream.buffer.getvalue() for stream in (out, err))  # type: ignore[attr-defined]
    if text:
        stdout, stderr = stdout.decode(), stderr.decode()
    returncode = code if isinstance(code, int) else (0 if code is None else 1)
    return subprocess.CompletedProcess(["pasd", *map(str, args)], returncode, stdout, stderr)


def tiny_model_args(pasd: Path = TINY_PASD, base: Path = TINY_BASE) -> list[str]:
    return ["--pasd", str(pasd), "--base", str(base)]


def tiny_stylize_args(pasd: Path = TINY_LIGHT, sd15: Path = TINY_BASE) -> list[str]:
    """`pasd stylize`'s model options for the tiny model (the personalized base is --style)."""
    return ["--pasd", str(pasd), "--base", str(sd15), "--caption", "none"]


@pytest.fixture(scope="session")
def reference():
    import torch

    return torch.load(REFERENCE / "reference_public.pt")


# The layers of the tiny UNet that `lcm_file`, a stand-in for the LCM-LoRA, merges into.
LCM_LAYERS = ["down_blocks.0.attentions.0.proj_in", "mid_block.attentions.0.proj_in", "up_blocks.3.resnets.2.conv2"]


@pytest.fixture(scope="session")
def lcm_file(tmp_path_factory):
    from tiny_bases import kohya_name, lora_pair, write_kohya_lora

    from pasd_cli.engine.loading import load_components

    unet = load_components(TINY_PASD, TINY_BASE).unet
    layers = {}
    for i, name in enumerate(LCM_LAYERS):
        down, up = lora_pair(unet.get_submodule(name).weight, 4, 90 + i)
        layers[kohya_name(name)] = (0.2 * down, up, 2.0)
    return write_kohya_lora(tmp_path_factory.mktemp("lcm") / "pytorch_lora_weights.safetensors", layers)


@pytest.fixture(scope="session")
def tiny_pipeline():
    import torch

    from pasd_cli.engine.pipeline import PASDPipeline

    return PASDPipeline.from_folders(TINY_PASD, TINY_BASE, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="session")
def tiny_blip_dir(tmp_path_factory):
    """A tiny random BLIP captioner folder, laid out like Salesforce/blip-image-captioning-base."""
    from tiny_captioners import build_tiny_blip

    return build_tiny_blip(tmp_path_factory.mktemp("blip"))


# The colorization reference (reference README, "Colorization reference").
COLOR_REFERENCE = REFERENCE / "color"
TINY_COLOR = COLOR_REFERENCE / "tiny-pasd" / "pasd_light_color" / "checkpoint-180000"
COLOR_INPUT = COLOR_REFERENCE / "color_public_input.png"


@pytest.fixture(scope="session")
def color_reference():
    """color_public.pt; its meta holds torch's version string type, allowed explicitly."""
    import torch
    from torch.torch_version import TorchVersion

    with torch.serialization.safe_globals([TorchVersion]):
        return torch.load(COLOR_REFERENCE / "color_public.pt")


@pytest.fixture(scope="session")
def tiny_colorizer():
    import torch

    from pasd_cli.engine.colorize_loading import load_colorizer

    return load_colorizer(TINY_COLOR, TINY_BASE, torch.device("cpu"), torch.float32)


# -- scale-out (test_scale*.py): one folder, and its outputs from one unsharded run ----------------


@pytest.fixture(scope="session")
def scale_photos(tmp_path_factory):
    from scale_jobs import make_photos

    root = tmp_path_factory.mktemp("scale")
    make_photos(root / "good", 9)  # their names give each of 3 shards and each of 2 some work
    bad = root / "bad"
    bad.mkdir()
    (bad / "notes.png").write_text("not a picture")  # fails from its header, remembered
    return root


@pytest.fixture(scope="session")
def scale_unsharded(scale_photos, tmp_path_factory):
    from scale_jobs import FAST, MODEL

    out = tmp_path_factory.mktemp("unsharded")
    proc = run_pasd("upscale", scale_photos / "good", "-o", out, *FAST, *MODEL, "--json")
    assert proc.returncode == 0, proc.stderr
    return out
