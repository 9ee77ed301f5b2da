"""The heap of denoising loops and untiled VAE encodes on the CPU
(cli/runtime.heap_reused_while_computing): inside it, tensors freed by one step are reused by the
next instead of being mapped and zeroed afresh;
afterwards the free memory is handed back, at once and then while no loop runs. Counted in the
kernel's page faults and the process's resident memory, on glibc."""

from __future__ import annotations

import resource
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import LR_INPUT, tiny_model_args
from hardening import pasd_in_process
from PIL import Image

from pasd_cli.cli import runtime
from pasd_cli.engine import UpscaleSettings
from pasd_cli.engine.settings import MIN_VAE_TILE

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or runtime._libc() is None, reason="glibc's allocator only"
)

MB = 2**20
_PR_SET_THP_DISABLE = 41


def _faults(rounds: int = 8, size: int = 16 * MB) -> int:
    """Page faults of rounds of what a step does with its activations: a tensor of `size` bytes
    is made, another from it, and both are freed."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        x = torch.empty(size, dtype=torch.uint8).fill_(1)
        y = x + 1
        del x, y
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _resident_anonymous() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon")


@contextmanager
def _small_pages():
    """Faults counted one per page: with transparent huge pages set to `always` (as on some
    machines, not this one's `madvise`), fresh 2 MB runs fault once, as often as the kernel
    finds huge pages free (measured outside the heap: 0.07 of the pages, or 0.51 on a CI
    machine). PR_SET_THP_DISABLE is the process's own switch."""
    libc = runtime._libc()
    if libc.prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
        pytest.skip("the kernel has no PR_SET_THP_DISABLE")
    try:
        yield
    finally:
        libc.prctl(_PR_SET_THP_DISABLE, 0, 0, 0, 0)


def _as_the_command_line_starts() -> None:
    """The heap as a `pasd` process has it before its first loop: what earlier tests freed
    handed back, the command line's thresholds."""
    runtime.limit_heap_fragmentation()
    runtime._libc().malloc_trim(0)


def _reuse_counts() -> tuple[int, int]:
    """Faults of the same rounds outside and then inside the loop's heap."""
    _as_the_command_line_starts()
    with _small_pages():
        mapped = _faults()
        with runtime.heap_reused_while_computing():
            # The heap reaches its size over the first rounds (measured: fresh pages up to the
            # fifth, from the remainders that alignment leaves), then holds.
            _faults(4)
            reused = _faults()
    return mapped, reused


@glibc
def test_the_steps_reuse_freed_memory():
    """Counted in a fresh interpreter, as a `pasd` process starts: in the suite's own process
    the earlier tests leave free holes in the heap, and a 16 MB tensor that fits one is served
    from it whatever the threshold (CI: 0.56 of the pages fresh; reproduced with a 20 MB hole)."""
    counted = subprocess.run(
        [sys.executable, "-c", "import test_denoise_heap as t; print(*t._reuse_counts())"],
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    mapped, reused = map(int, counted.stdout.split()[-2:])
    pages = 8 * 2 * 16 * MB // resource.getpagesize()
    # Each tensor is fresh memory (measured 1.0 of its pages).
    assert mapped > 0.75 * pages, counted.stderr
    # Measured over 10 runs: 0 to 0.06 of the faults outside (after one round only: up to 0.31).
    assert reused < 0.4 * mapped, (reused, mapped)


@glibc
def test_the_free_heap_is_handed_back_after_the_steps():
    _as_the_command_line_starts()
    with runtime.heap_reused_while_computing():
        held = [torch.ones(12 * MB, dtype=torch.uint8) for _ in range(8)]  # 96 MB in the heap
        base = _resident_anonymous() - 96 * MB
        del held
        assert _resident_anonymous() - base > 64 * MB  # kept for the next step
    assert _resident_anonymous() - base < 32 * MB
    # Outside the loops, what later passes free in the heap goes back within a trim period:
    # blocks under the 4 MB threshold, each followed by one that stays, so that none can merge
    # into the heap's top (measured without the trimming thread: 99 MB kept).
    held, pins = [], []
    for _ in range(48):
        held.append(torch.ones(2 * MB, dtype=torch.uint8))
        pins.append(torch.ones(16 * 1024))
    base = _resident_anonymous() - 96 * MB
    del held
    time.sleep(3 * runtime._ComputeHeap.TRIM_EVERY)
    assert _resident_anonymous() - base < 32 * MB
    del pins


@pytest.mark.parametrize("vae_tile", [0, MIN_VAE_TILE])
def test_denoising_loops_and_untiled_vae_encodes_run_in_the_pipelines_scope(tiny_pipeline, monkeypatch, vae_tile):
    """The UNet runs only inside `compute_scope`, entered once per denoising loop; the VAE's
    encode runs inside it when untiled, outside when tiled; the decode, always outside."""
    inside = [False]
    entered, unet_calls, encoder_calls, decoder_calls = [], [], [], []

    @contextmanager
    def scope():
        entered.append(True)
        inside[0] = True
        try:
            yield
        finally:
            inside[0] = False

    monkeypatch.setattr(tiny_pipeline, "compute_scope", scope, raising=False)
    vae = tiny_pipeline.vae.vae
    hooks = [
        tiny_pipeline.unet.register_forward_pre_hook(lambda module, args: unet_calls.append(inside[0])),
        vae.encoder.conv_in.register_forward_pre_hook(lambda module, args: encoder_calls.append(inside[0])),
        vae.decoder.conv_out.register_forward_pre_hook(lambda module, args: decoder_calls.append(inside[0])),
    ]
    try:
        result = tiny_pipeline.upscale(
            Image.open(LR_INPUT), UpscaleSettings(steps=3, guidance=1.0, scale=2, process_size=64, vae_tile=vae_tile)
        )
    finally:
        for hook in hooks:
            hook.remove()
    assert result.vae_tile == vae_tile
    assert unet_calls == [True] * 3
    assert encoder_calls and decoder_calls
    untiled = vae_tile == 0
    assert entered == [True] * (2 if untiled else 1)
    assert set(encoder_calls) == {untiled} and not any(decoder_calls)


def test_the_command_line_denoises_in_the_heap_on_the_cpu(tmp_path: Path, capsys, monkeypatch):
    entered = []
    real = runtime.heap_reused_while_computing

    @contextmanager
    def counted():
        entered.append(True)
        with real():
            yield

    monkeypatch.setattr(runtime, "heap_reused_while_computing", counted)
    args = [*tiny_model_args(), "--device", "cpu", "--dtype", "fp32", "--caption", "none"]
    args += ["--scale", "2", "--steps", "2", "--guidance", "1", "--process-size", "16"]
    done = pasd_in_process(capsys, "upscale", LR_INPUT, "-o", tmp_path, *args)
    assert done.code == 0, done.stderr
    assert entered == [True] * 2  # the encode, the denoising loop
    assert any(tmp_path.iterdir())
    # pasd_here stopped the run's trimming thread (runtime.stop_heap_trimming), as it must for
    # the tests after it.
    assert "pasd-heap-trim" not in {thread.name for thread in threading.enumerate()}
