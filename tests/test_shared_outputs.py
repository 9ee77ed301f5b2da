"""Files that several workers write into one output folder: the failure memory is saved under a
lock and merged with what others saved meanwhile."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from pasd_cli.batch.failures import FAILURES_FILE, FailureLog


def test_two_workers_saving_the_failure_memory_keep_each_others_changes(tmp_path):
    inputs = {name: tmp_path / name for name in ("a.png", "b.png", "c.png")}
    for path in inputs.values():
        path.write_bytes(b"not an image")
    first = FailureLog(tmp_path)
    first.record(inputs["a.png"], "cannot decode")
    first.save()
    worker0, worker1 = FailureLog(tmp_path), FailureLog(tmp_path)  # both read it as it was
    worker0.forget(inputs["a.png"])  # a now works
    worker1.record(inputs["b.png"], "empty file")
    worker0.record(inputs["c.png"], "not an image")
    worker1.save()
    worker0.save()
    kept = json.loads((tmp_path / FAILURES_FILE).read_text())["failures"]
    assert sorted(kept) == sorted(os.path.realpath(inputs[n]) for n in ("b.png", "c.png"))


SAVE_MANY = """
import sys
from pathlib import Path
from pasd_cli.batch.failures import FailureLog
folder, worker = Path(sys.argv[1]), sys.argv[2]
for index in range(15):
    path = folder / f"w{worker}-{index}.png"
    path.write_bytes(b"x")
    log = FailureLog(folder)
    log.record(path, "cannot decode")
    log.save()
"""


def test_workers_saving_the_failure_memory_at_the_same_time_lose_nothing(tmp_path):
    workers = [subprocess.Popen([sys.executable, "-c", SAVE_MANY, tmp_path, str(w)]) for w in range(4)]
    assert [process.wait(60) for process in workers] == [0] * 4
    kept = json.loads((tmp_path / FAILURES_FILE).read_text())["failures"]
    assert len(kept) == 4 * 15
