"""What `pasd upscale` says while it works (README, "--json" paragraph and the -q/-v row): results
on stdout; progress on stderr, as Rich bars when stderr is a terminal and as plain lines otherwise;
`-q` keeps only errors. The real command in a subprocess with the tiny reference model.

How the command decides (pasd_cli/report.py): `Reporter` draws Rich bars when stderr.isatty() and
not -q; Rich then animates only on a console it takes for a terminal, which it decides from
TTY_COMPATIBLE, FORCE_COLOR, isatty() and TERM (dumb/unknown: no cursor movement). The terminal
test therefore gives the command a real pseudo-terminal as stderr and an environment without
those overrides."""

from __future__ import annotations

import fcntl
import os
import re
import struct
import subprocess
import termios
import threading
from pathlib import Path

import numpy as np
from conftest import pasd_command, pasd_here, run_pasd, tiny_model_args
from PIL import Image

MODEL = [*tiny_model_args(), "--device", "cpu", "--dtype", "fp32", "--caption", "none"]
FAST = ["--scale", "2", "--steps", "1", "--guidance", "1", "--process-size", "16"]
ANSI = re.compile(r"\x1b\[")
# Environment variables by which Rich (or a CI runner) would override what the terminal says.
TERMINAL_OVERRIDES = (
    "TTY_COMPATIBLE",
    "TTY_INTERACTIVE",
    "FORCE_COLOR",
    "NO_COLOR",
    "COLUMNS",
    "LINES",
    "JUPYTER_COLUMNS",
    "JUPYTER_LINES",
    "CI",
    "GITHUB_ACTIONS",
)


def _photo(path: Path, seed: int = 0, size=(16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _two_photos(folder: Path) -> list[Path]:
    return [_photo(folder / "first.png", 1), _photo(folder / "second.png", 2)]


# ---- progress without a terminal: plain lines ------------------------------------------------------


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(tmp_path):
    first, second = _two_photos(tmp_path / "in")
    out = tmp_path / "out"
    proc = pasd_here("upscale", first, second, "-o", out, *FAST, *MODEL, env={"TERM": "xterm"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [str(out / "first.png"), str(out / "second.png")]  # results only
    assert not ANSI.search(proc.stderr) and not ANSI.search(proc.stdout), repr(proc.stderr)
    lines = proc.stderr.splitlines()
    # README: `[3/40] in/c.jpg (eta 12m30s)`; no ETA before one image has been timed.
    assert f"[1/2] {first}" in lines, lines
    assert any(re.fullmatch(rf"\[2/2\] {re.escape(str(second))} \(eta \d+s\)", line) for line in lines), lines
    assert lines.index(f"[1/2] {first}") < next(i for i, line in enumerate(lines) if line.startswith("[2/2]"))
    assert re.fullmatch(r"2 done in \d+s", lines[-1]), lines


def test_verbose_plain_progress_reports_every_step(tmp_path):
    photo = _photo(tmp_path / "a.png")
    out = tmp_path / "out"
    proc = pasd_here("upscale", photo, "-o", out, "-v", *FAST, "--steps", "3", *MODEL)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [str(out / "a.png")]
    steps = [line.strip() for line in proc.stderr.splitlines() if line.strip().startswith("step ")]
    assert steps == ["step 1/3", "step 2/3", "step 3/3"], proc.stderr
    assert not ANSI.search(proc.stderr)


# ---- progress on a terminal: Rich ------------------------------------------------------------------


def _read_all(fd: int, chunks: list[bytes]) -> None:
    """Drain the terminal's leader side until the command has closed its end (EIO on Linux)."""
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            return
        if not data:
            return
        chunks.append(data)


def test_progress_is_drawn_by_rich_when_stderr_is_a_terminal(tmp_path):
    _two_photos(tmp_path / "in")
    first, second = Path("in/first.png"), Path("in/second.png")  # short: a bar's text is cut to fit
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in TERMINAL_OVERRIDES}
    env["TERM"] = "xterm"
    leader, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 rows, 120 columns
    chunks: list[bytes] = []
    reader = threading.Thread(target=_read_all, args=(leader, chunks), daemon=True)
    reader.start()
    try:
        # Enough steps that the bars refresh (10 times a second) while an image is denoised.
        proc = subprocess.run(
            [*pasd_command(), "upscale", str(first), str(second), "-o", str(out), *FAST, "--steps", "30", *MODEL],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=terminal,
            env=env,
            cwd=tmp_path,
            timeout=120,
        )
    finally:
        os.close(terminal)
        reader.join(timeout=10)
        os.close(leader)
    screen = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0, screen
    # stdout, a pipe, still carries only the results.
    assert proc.stdout.decode().splitlines() == [str(out / "first.png"), str(out / "second.png")]
    # Rich's live display: cursor control, the images bar naming the current image, the steps bar.
    assert "\x1b[?25l" in screen, repr(screen)  # cursor hidden while the bars are drawn
    assert ANSI.search(screen.replace("\x1b[?25l", "").replace("\x1b[?25h", "")), repr(screen)
    assert f"images  {first}" in screen and f"images  {second}" in screen, repr(screen)
    assert "steps" in screen and re.search(r"\b\d+/30\b", screen), repr(screen)
    # ... and not the plain lines meant for logs.
    assert f"[1/2] {first}" not in screen and "step 1/30" not in screen, repr(screen)
    assert re.search(r"2 done in \d+s", screen), repr(screen)  # the summary stays after the bars go


# ---- -q --------------------------------------------------------------------------------------------


def test_quiet_success_prints_nothing_on_stderr(tmp_path):
    first, second = _two_photos(tmp_path / "in")
    out = tmp_path / "out"
    proc = run_pasd("upscale", first, second, "-o", out, "-q", *FAST, *MODEL)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.splitlines() == [str(out / "first.png"), str(out / "second.png")]
    assert (out / "first.png").is_file() and (out / "second.png").is_file()
    # A re-run that skips everything is silent too (without -q it prints its summary).
    again = run_pasd("upscale", first, second, "-o", out, "-q", *FAST, *MODEL)
    assert again.returncode == 0 and again.stderr == "" and again.stdout == ""
    loud = run_pasd("upscale", first, second, "-o", out, *FAST, *MODEL)
    assert loud.returncode == 0 and loud.stderr.splitlines() == ["2 skipped in 0s"]


def test_quiet_still_reports_failed_inputs(tmp_path):
    good = _photo(tmp_path / "in" / "good.png")
    notes = tmp_path / "in" / "notes.png"
    notes.write_text("not a picture\n")  # refused from its header
    truncated = tmp_path / "in" / "truncated.png"
    truncated.write_bytes(_photo(tmp_path / "whole.png", 3, (64, 64)).read_bytes()[:300])  # fails on decoding
    out = tmp_path / "out"
    proc = run_pasd("upscale", notes, good, truncated, "-o", out, "-q", *FAST, *MODEL)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.splitlines() == [str(out / "good.png")]
    lines = proc.stderr.splitlines()
    assert len(lines) == 2, proc.stderr
    assert lines[0].startswith(f"error: {notes}: not an image"), lines
    assert lines[1].startswith(f"error: {truncated}: "), lines
