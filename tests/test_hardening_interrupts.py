"""SIGINT and SIGTERM at any point exit 130 with every input accounted for. The interrupt is no
Exception, so neither a library's `except Exception` (a weights reader calling every failure a
damaged file, a lazy import wrapping what fails in it) nor the batch's guard against a bug on
one image turns it into another error. The signals here are real, sent by the process to itself
through the handler the command line installs."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_PASD, run_pasd, tiny_model_args
from model_free import Enlarge
from PIL import Image

from pasd_cli.errors import Interrupted, ModelError
from pasd_cli.interrupts import deferred, install


@pytest.fixture
def handlers():
    """The command line's handlers, for this test only."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    install()
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def _signal_self(sig: signal.Signals) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(1)  # the handler runs here


def test_a_signal_while_weights_are_read_is_no_model_error(handlers, monkeypatch):
    import safetensors.torch

    from pasd_cli.engine.weights import read_state_dict

    real = safetensors.torch.load_file

    def read_interrupted(*args, **kwargs):
        _signal_self(signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "load_file", read_interrupted)
    with pytest.raises(Interrupted, match="SIGTERM"):
        read_state_dict(TINY_PASD / "unet" / "diffusion_pytorch_model.safetensors")
    assert not issubclass(Interrupted, Exception) and not issubclass(Interrupted, ModelError)


class _WrapsFailures(Enlarge):
    """Its work calls a library that wraps every Exception in its own error (as diffusers' and
    transformers' lazy imports do), and a signal arrives inside it on the second image."""

    def transform(self, rgb, job, progress):
        try:
            if job.source.stem == "b":
                _signal_self(signal.SIGINT)
        except Exception as exc:
            raise RuntimeError(f"Failed to import something: {exc}") from exc
        return super().transform(rgb, job, progress)


def test_a_signal_inside_a_library_stops_the_batch_and_accounts_for_every_input(handlers, capsys, tmp_path):
    import io

    from pasd_cli.batch.runner import run_batch
    from pasd_cli.batch.settings import BatchSettings

    photos = tmp_path / "in"
    photos.mkdir()
    for i, stem in enumerate("abcd"):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
            photos / f"{stem}.png"
        )
    batch = BatchSettings(inputs=(str(photos),), output=str(tmp_path / "out"), json=True)
    with pytest.raises(Interrupted):
        run_batch(_WrapsFailures(batch), batch, stdin=io.StringIO())
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    statuses = {Path(r["input"]).stem: r["status"] for r in lines if r["type"] == "image"}
    assert statuses == {"a": "done", "b": "interrupted", "c": "cancelled", "d": "cancelled"}
    assert lines[-1]["error"] == "interrupted by SIGINT" and lines[-1]["total"] == 4
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png"]  # nothing else, no temporary file


def test_a_signal_inside_a_deferred_block_waits_for_its_end(handlers):
    finished = []
    with pytest.raises(Interrupted, match="SIGINT"):
        with deferred():
            _signal_self(signal.SIGINT)
            finished.append(True)
    assert finished == [True]


def test_a_deferred_block_in_another_thread_neither_holds_back_nor_takes_the_interrupt(handlers):
    """A background write's clean-up runs in a deferred block of its own thread; a Ctrl-C that
    arrives meanwhile is the main thread's, at once."""
    inside, leave, outcome = threading.Event(), threading.Event(), []

    def background():
        try:
            with deferred():
                inside.set()
                leave.wait(10)
            outcome.append("left quietly")
        except Interrupted:
            outcome.append("took the interrupt")

    worker = threading.Thread(target=background)
    worker.start()
    inside.wait(10)
    try:
        with pytest.raises(Interrupted, match="SIGINT"):
            _signal_self(signal.SIGINT)
            time.sleep(5)  # the handler raises in this thread long before
    finally:
        leave.set()
        worker.join(10)
    assert outcome == ["left quietly"]


@pytest.mark.parametrize("point", ["start:1:INT", "load:1:TERM:0.2"])
def test_a_signal_while_the_command_line_or_torch_loads_exits_130(tmp_path, point):
    photos = tmp_path / "in"
    photos.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(photos / f"p{i}.png")
    args = ["upscale", photos, "-o", tmp_path / "out", *tiny_model_args(), "--device", "cpu", "--caption", "none"]
    proc = run_pasd(*args, "--json", env={"PASD_FAULT": point}, timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: interrupted by SIG")
    if point.startswith("load"):  # planned by then: every input is accounted for, as cancelled
        lines = [json.loads(line) for line in proc.stdout.splitlines()]
        assert [r["status"] for r in lines[:-1]] == ["cancelled"] * 3 and lines[-1]["cancelled"] == 3
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_the_write_stage_is_a_plain_line_only_with_v():
    """Writes report a "write" stage (where a signal may land, see the fault-injection test);
    a cron log gets no line of it without -v, however long ago the last line was."""
    import io

    from pasd_cli.batch.report import NORMAL, VERBOSE, Reporter

    for verbosity, expected in ((NORMAL, ""), (VERBOSE, "  write 0/1\n")):
        stderr = io.StringIO()
        reporter = Reporter(verbosity=verbosity, stderr=stderr, live=False)
        reporter._last_line = -1e9
        reporter.progress("write", 0, 1)
        assert stderr.getvalue() == expected
