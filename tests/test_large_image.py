"""An 8192x8192 output from the real command with the tiny model, in bounded memory.

Slow: run with `-m slow` (22 minutes on the 2-core development CPU; 37 on one thread, as the
suite's other tests run). benchmarks/bench_tiling.py reports the same run with stage times
beside smaller sizes.
"""

from __future__ import annotations

import os
import resource

import numpy as np
import pytest
from conftest import run_pasd, tiny_model_args
from PIL import Image

# Beyond the suite's 10-minute limit per test (pytest-timeout), which would stop the run midway.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3 * 3600)]


def test_8k_output_in_under_6_gb(tmp_path):
    side = 2048
    yy, xx = np.mgrid[0:side, 0:side] / side
    Image.fromarray((np.stack([xx, yy, (xx + yy) / 2], -1) * 255).astype(np.uint8)).save(tmp_path / "scan.png")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = run_pasd(
        "upscale",
        tmp_path / "scan.png",
        "-o",
        tmp_path / "out",
        *tiny_model_args(),
        "--scale",
        "4",
        "--process-size",
        "64",
        "--steps",
        "1",
        "--guidance",
        "1",
        "--latent-tile",
        "32",
        "--latent-overlap",
        "8",
        "--latent-blend",
        "ramp",
        "--tile-batch",
        "4",
        "--vae-memory",
        "1024",
        "--vae-attention-window",
        "32",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        "--max-pixels",
        "70000000",  # 67.1 MP of working size: above the default limit of 64 MP
        timeout=3 * 3600,
        # Every core, as a user's run has them (the suite's one thread per test suits tiny runs).
        env={"OMP_NUM_THREADS": str(os.cpu_count() or 1)},
    )
    assert proc.returncode == 0, proc.stderr
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: kB
    assert peak > before * 1024
    with Image.open(tmp_path / "out" / "scan.png") as result:
        assert result.size == (8192, 8192)
    assert peak < 6 * 2**30, f"peak RSS {peak / 2**30:.2f} GiB"
