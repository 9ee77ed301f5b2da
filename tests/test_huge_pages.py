"""Large CPU tensors in transparent huge pages (cli/runtime.use_huge_pages): asked of torch's
allocator by the command line before torch loads, where the system leaves it to programs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import LR_INPUT, run_pasd, tiny_model_args
from PIL import Image

from pasd_cli.cli import runtime

ADVISED = "always [madvise] never\n"
madvise_here = pytest.mark.skipif(
    not sys.platform.startswith("linux")
    or not runtime.THP_SETTING.exists()
    or "[madvise]" not in runtime.THP_SETTING.read_text(),
    reason="transparent huge pages on request (madvise) only",
)


@pytest.mark.parametrize(
    ("setting", "asked"),
    [(ADVISED, "1"), ("[always] madvise never\n", None), ("always madvise [never]\n", None), (None, None)],
)
def test_huge_pages_are_asked_for_only_where_programs_must_ask(tmp_path, monkeypatch, setting, asked):
    if not sys.platform.startswith("linux"):
        pytest.skip("Linux's transparent huge pages")
    thp = tmp_path / "enabled"
    if setting is not None:
        thp.write_text(setting)
    monkeypatch.setattr(runtime, "THP_SETTING", thp)
    monkeypatch.delenv(runtime.TORCH_HUGE_PAGES, raising=False)
    runtime.use_huge_pages()
    assert runtime.os.environ.get(runtime.TORCH_HUGE_PAGES) == asked


def test_the_users_choice_of_huge_pages_stays(tmp_path, monkeypatch):
    thp = tmp_path / "enabled"
    thp.write_text(ADVISED)
    monkeypatch.setattr(runtime, "THP_SETTING", thp)
    monkeypatch.setenv(runtime.TORCH_HUGE_PAGES, "0")
    runtime.use_huge_pages()
    assert runtime.os.environ[runtime.TORCH_HUGE_PAGES] == "0"


def _huge_kb_of_a_fresh_tensor(choice: str | None) -> int:
    """AnonHugePages of a new process that asks as the command line does, then fills 256 MB."""
    script = (
        "import sys\n"
        "from pasd_cli.cli.app import main\n"
        "try:\n"
        "    main(['--version'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "assert 'torch' not in sys.modules\n"
        "import torch\n"
        "x = torch.ones(64 << 20)\n"
        "for line in open('/proc/self/smaps_rollup'):\n"
        "    if line.startswith('AnonHugePages:'):\n"
        "        print(line.split()[1])\n"
    )
    env = {k: v for k, v in runtime.os.environ.items() if k != runtime.TORCH_HUGE_PAGES}
    if choice is not None:
        env[runtime.TORCH_HUGE_PAGES] = choice
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.split()[-1])


@madvise_here
def test_the_command_line_gets_large_tensors_huge_pages():
    # The process's environment is the command line's choice to make: main() runs first.
    assert _huge_kb_of_a_fresh_tensor(None) > 128 * 1024
    assert _huge_kb_of_a_fresh_tensor("0") == 0


@madvise_here
def test_huge_pages_leave_the_output_unchanged(tmp_path: Path):
    """The same bits with and without: the allocator aligns large buffers to the page (64 bytes
    otherwise), which must not move any kernel's sums. The VAE decoder's tensors at this size (16
    channels at 400x240, 6 MB) are above the 2 MB where huge pages start."""
    outputs = {}
    for choice in ("1", "0"):
        out = tmp_path / choice
        args = ["upscale", LR_INPUT, "-o", out, *tiny_model_args(), "--device", "cpu", "--dtype", "fp32"]
        args += ["--caption", "none", "--scale", "4", "--process-size", "240", "--steps", "2"]
        proc = run_pasd(*args, env={runtime.TORCH_HUGE_PAGES: choice})
        assert proc.returncode == 0, proc.stderr
        outputs[choice] = np.asarray(Image.open(out / LR_INPUT.with_suffix(".png").name))
    assert outputs["1"].shape[:2] == (240, 400)
    assert np.array_equal(outputs["1"], outputs["0"])
