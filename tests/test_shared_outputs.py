"""Files that several workers write into one output folder: the failure memory (saved under a
lock, merged with what others saved meanwhile) and the temporary files a killed writer leaves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from pasd_cli.atomic import STALE_AFTER, remove_stale_parts, write_atomic
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


def test_temporary_files_of_dead_writers_are_removed_and_others_kept(tmp_path):
    target = tmp_path / "photo.png"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    host = os.uname().nodename.replace(".", "_")
    left = tmp_path / f".photo.png.{dead_pid}@{host}.k2j4.part"
    mine = tmp_path / f".photo.png.{os.getpid()}@{host}.a8xz.part"  # being written now
    elsewhere = tmp_path / ".photo.png.77@other_machine.q1w2.part"  # cannot be checked: by its age
    old_elsewhere = tmp_path / ".photo.png.78@other_machine.q1w3.part"
    older_version = tmp_path / ".photo.png.zz81.part"
    other_target = tmp_path / f".other.png.{dead_pid}@{host}.k2j4.part"
    for path in (left, mine, elsewhere, old_elsewhere, older_version, other_target):
        path.write_bytes(b"partial")
    past = time.time() - STALE_AFTER - 60
    for path in (old_elsewhere, older_version):
        os.utime(path, (past, past))
    removed = remove_stale_parts([target])
    assert sorted(removed) == sorted([left, old_elsewhere, older_version])
    assert mine.exists() and elsewhere.exists() and other_target.exists()
    write_atomic(target, lambda handle: handle.write(b"done"))  # its own name is one it recognises
    assert target.read_bytes() == b"done"
