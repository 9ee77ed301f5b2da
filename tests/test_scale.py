"""`--shard I/N`: the partition of a planned batch, the files several workers share, and the
shards run through the command line (in this process) against one unsharded run."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_BASE
from scale_jobs import FAST, MODEL, make_photos, outputs, pasd_here, records

from pasd_cli.batch.failures import FAILURES_FILE
from pasd_cli.batch.plan import Job, Plan
from pasd_cli.batch.records import Summary
from pasd_cli.batch.shard import Shard, job_key, owner
from pasd_cli.batch.world import merged
from pasd_cli.errors import DeviceError

# -- the partition ---------------------------------------------------------------------------------


def _plan(names: list[str], out: Path = Path("/data/out")) -> Plan:
    return Plan([Job(Path("/in") / n, Path(n), True, output=out / n) for n in names])


NAMES = [f"frame{i:05d}.png" for i in range(3000)]


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_the_shares_are_disjoint_cover_every_job_and_are_even(count):
    plan = _plan(NAMES)
    shares = [Shard(i, count).share(plan, Path("/data/out")) for i in range(count)]
    taken = [job.source for share in shares for job in share.jobs]
    assert sorted(taken) == sorted(job.source for job in plan.jobs)  # each job exactly once
    sizes = [len(share.jobs) for share in shares]
    assert max(sizes) - min(sizes) < 0.15 * len(NAMES) / count  # frames of one film are not bunched
    place = {id(job): index for index, job in enumerate(plan.jobs)}
    for share in shares:  # each share keeps the plan's order
        order = [place[id(job)] for job in share.jobs]
        assert order == sorted(order)


def test_adding_images_moves_none_and_one_more_worker_takes_a_fair_part_from_each():
    before = {name: owner(name, 4) for name in NAMES}
    assert {name: owner(name, 4) for name in [*NAMES, "new1.png", "new2.png"]}.items() >= before.items()
    after = {name: owner(name, 5) for name in NAMES}
    moved = [name for name in NAMES if after[name] != before[name]]
    assert all(after[name] == 4 for name in moved)  # only to the new worker
    assert 0.15 < len(moved) / len(NAMES) < 0.25  # about 1/5


def test_the_owner_is_the_same_in_every_process_and_wherever_the_folders_are_mounted():
    """Python's own hash() is salted per process: the partition must not depend on it."""
    code = "from pasd_cli.batch.shard import owner; print([owner(f'frame{i}.png', 5) for i in range(50)])"
    seen = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2")
    }
    assert seen == {str([owner(f"frame{i}.png", 5) for i in range(50)]) + "\n"}
    here = Job(Path("/mnt/a/in/x.jpg"), Path("sub/x.jpg"), True, output=Path("/mnt/a/out/sub/x.png"))
    there = Job(Path("/data/in/x.jpg"), Path("sub/x.jpg"), True, output=Path("/data/out/sub/x.png"))
    assert job_key(here, Path("/mnt/a/out")) == job_key(there, Path("/data/out")) == "sub/x.png"


@pytest.mark.parametrize("spec", ["3/3", "-1/2", "1/0", "1", "a/b", "1/2/3"])
def test_a_shard_that_names_no_share_is_refused(spec):
    with pytest.raises(ValueError):
        Shard.parse(spec)


def test_merged_summaries_add_counts_and_counters():
    one = Summary(seconds=3.0, extra={"prompts": {"none": 2, "sidecar": 1}})
    one.counts.update(done=2, failed=1)
    two = Summary(seconds=5.0, error="boom", extra={"prompts": {"none": 3, "sidecar": 0}})
    two.counts.update(done=3, skipped=4)
    total = merged([one, two])
    assert total.counts == {"done": 5, "failed": 1, "skipped": 4}
    assert total.seconds == 5.0 and total.error == "boom" and total.exit_code == 1
    assert total.extra == {"prompts": {"none": 5, "sidecar": 1}, "workers": 2}


# -- the command line, in this process -------------------------------------------------------------


def test_device_names_a_gpu_by_number_and_torchrun_gives_each_worker_its_own():
    from pasd_cli.cli.runtime import pick_device

    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA was asked for"):
            pick_device("cuda:1")
        with pytest.raises(DeviceError, match="CUDA was asked for"):
            pick_device("cuda", local_rank=1)
        assert pick_device("auto", local_rank=1) == torch.device("cpu")
    else:
        assert pick_device("cuda", local_rank=0) == torch.device("cuda:0")
        with pytest.raises(DeviceError, match="CUDA device"):
            pick_device(f"cuda:{torch.cuda.device_count()}")


def test_three_shards_do_every_image_once_with_the_unsharded_pixels(scale_photos, scale_unsharded, tmp_path, capfd):
    """Must-show 1: --shard 0/3, 1/3 and 2/3 over one folder, into which a killed run had left a
    temporary file."""
    out = tmp_path / "out"
    out.mkdir()
    left = out / ".photo03.png.x1y2z3w4.part"  # no writer holds it
    left.write_bytes(b"half an image")
    taken: list[list[dict]] = []
    for index in range(3):
        args = ["upscale", scale_photos / "good", scale_photos / "bad", "-o", out, *FAST, *MODEL, "--json"]
        code, stdout, stderr = pasd_here(capfd, *args, "--shard", f"{index}/3")
        images, summaries = records(stdout)
        assert code == (1 if any(r["status"] == "failed" for r in images) else 0), stderr
        assert len(summaries) == 1 and summaries[0]["total"] == len(images)
        taken.append(images)
    inputs = [r["input"] for share in taken for r in share]
    every = [*(scale_photos / "good").iterdir(), scale_photos / "bad" / "notes.png"]
    assert sorted(inputs) == sorted(str(p) for p in every)
    assert all(share for share in taken)
    assert outputs(out).keys() == outputs(scale_unsharded).keys()
    for name, image in outputs(out).items():
        assert (image == outputs(scale_unsharded)[name]).all(), name
    failures = json.loads((out / FAILURES_FILE).read_text())["failures"]
    assert list(failures) == [os.path.realpath(scale_photos / "bad" / "notes.png")]
    assert not left.exists()
    # The same command again: each worker finds its share done.
    again = [records(pasd_here(capfd, *args, "--shard", f"{i}/3")[1])[0] for i in range(3)]
    assert sorted(r["input"] for share in again for r in share) == sorted(inputs)
    assert {r["status"] for share in again for r in share} == {"skipped"}


def test_a_worker_remembers_only_its_own_failures_so_none_is_skipped_unreported(tmp_path, capfd):
    """A worker plans every input, but an input that fails in another worker's share is that
    worker's to report: remembered earlier, the owner would skip it without a word."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "notes.png").write_text("not a picture")
    assert owner("notes.png", 2) == 1
    args = ["upscale", folder, "-o", tmp_path / "out", "--json"]
    code, stdout, _ = pasd_here(capfd, *args, "--shard", "0/2")  # runs first, alone
    assert code == 0 and records(stdout)[0] == []
    code, stdout, _ = pasd_here(capfd, *args, "--shard", "1/2")
    assert code == 1 and [r["status"] for r in records(stdout)[0]] == ["failed"]


def test_the_dry_run_plans_the_whole_folder_and_lists_each_share(scale_photos, tmp_path, capfd):
    plan = ["upscale", scale_photos / "good", "-o", tmp_path, "--dry-run", "--json"]
    whole = records(pasd_here(capfd, *plan)[1])[0]
    shares = [records(pasd_here(capfd, *plan, "--shard", s)[1])[0] for s in ("0/2", "1/2")]
    assert sorted(json.dumps(r) for r in whole) == sorted(json.dumps(r) for share in shares for r in share)
    assert shares[0] and shares[1]


def test_a_collision_anywhere_in_the_folder_stops_every_shard(tmp_path, capfd):
    folder = tmp_path / "in"
    make_photos(folder, 4)
    (folder / "photo00.png").rename(folder / "Same.png")
    (folder / "photo01.png").rename(folder / "same.png")  # one output on macOS and Windows
    codes = []
    for spec in ("0/4", "1/4", "2/4", "3/4"):
        code, _, stderr = pasd_here(capfd, "upscale", folder, "-o", tmp_path / "out", *MODEL, "--shard", spec)
        assert "collision" in stderr
        codes.append(code)
    assert codes == [2, 2, 2, 2] and not (tmp_path / "out").exists()


def test_the_lock_is_per_shard(scale_photos, tmp_path, capfd):
    lock = tmp_path / "pasd.lock"
    held = os.open(f"{lock}.0-of-2", os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run of shard 0 holds it
    try:
        args = ["upscale", scale_photos / "good", "-o", tmp_path / "out", "--dry-run", "--lock", lock]
        code, _, stderr = pasd_here(capfd, *args, "--shard", "0/2")
        assert code == 4 and "holds the lock" in stderr
        code, _, stderr = pasd_here(capfd, *args, "--shard", "1/2")
        assert code == 0, stderr
    finally:
        os.close(held)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shard", "2/2"], "--shard 2/2: the index must be in [0, 2)"),
        (["--shard", "half"], "--shard half: expected I/N"),
        (["--device", "gpu:1"], "--device gpu:1: choose from auto, cpu, cuda, mps, cuda:N"),
        (["--peer-timeout", "0"], "--peer-timeout 0: must be more than 0"),
    ],
)
def test_shards_and_devices_that_cannot_be_are_usage_errors(tmp_path, capfd, args, message):
    code, _, stderr = pasd_here(capfd, "upscale", tmp_path, "-o", tmp_path / "out", "--dry-run", *args)
    assert code == 2 and f"error: {message}" in stderr


def test_device_accepts_a_gpu_number_everywhere(tmp_path, capfd):
    make_photos(tmp_path / "in", 1)
    style = ["--style", TINY_BASE]  # a personalized SD 1.5 folder
    for command, extra in (("upscale", []), ("stylize", style), ("colorize", [])):
        args = [command, tmp_path / "in", "-o", tmp_path / command, "--dry-run", "--device", "CUDA:1", *extra]
        code, _, stderr = pasd_here(capfd, *args)
        assert code == 0, stderr


def test_shard_under_torchrun_is_refused_the_rank_is_the_shard(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, stderr = pasd_here(capfd, "upscale", tmp_path, "-o", tmp_path / "out", "--dry-run", "--shard", "0/2")
    assert code == 2 and "torchrun splits the work already (worker 1 of 2)" in stderr


# -- workers meeting at the end, in this process (threads stand in for workers) ---------------------


def _meet_in_threads(monkeypatch, peer_timeout: float):
    """Two Meetings on one store (rank 0 hosts it): the second is a peer the test controls."""
    import threading

    from scale_jobs import free_port

    from pasd_cli.batch.world import Meeting, World

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    meetings: dict[int, Meeting] = {}
    joins = [
        threading.Thread(target=lambda r=rank: meetings.__setitem__(r, Meeting(World(r, 2, 0, peer_timeout))))
        for rank in (0, 1)
    ]
    for join in joins:
        join.start()
    for join in joins:
        join.join(30)
    return meetings[0], meetings[1]


@pytest.mark.parametrize("dies", [0, 1])
def test_a_peer_whose_heartbeat_stops_is_given_up_after_the_peer_timeout(monkeypatch, dies):
    meetings = _meet_in_threads(monkeypatch, peer_timeout=1.0)
    survivor, dead = meetings[1 - dies], meetings[dies]
    dead._stop.set()  # its counter stops, as when its process is killed
    began = time.monotonic()
    with pytest.raises(DeviceError, match=f"worker {dies} stopped for 1s before finishing") as info:
        survivor.merge(Summary(), "gloo")
    assert time.monotonic() - began < 10
    assert "run the same command again" in (info.value.hint or "")


def test_a_peer_that_stops_with_an_error_releases_the_others_at_once(monkeypatch):
    survivor, failed = _meet_in_threads(monkeypatch, peer_timeout=600.0)
    failed.leave("interrupted by SIGTERM")
    began = time.monotonic()
    with pytest.raises(DeviceError, match=r"worker 1 stopped before finishing \(interrupted by SIGTERM\)"):
        survivor.merge(Summary(), "gloo")
    assert time.monotonic() - began < 10


def test_a_worker_interrupted_while_it_waits_tells_the_others(monkeypatch):
    import signal

    from pasd_cli.errors import Interrupted

    waiting, other = _meet_in_threads(monkeypatch, peer_timeout=600.0)

    def interrupt(signum, frame):
        raise Interrupted("interrupted by SIGALRM")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    try:
        with pytest.raises(Interrupted):
            waiting.merge(Summary(), "gloo")  # rank 0 waits for rank 1, which never finishes
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    with pytest.raises(DeviceError, match=r"worker 0 stopped before finishing \(interrupted by SIGALRM\)"):
        other.merge(Summary(), "gloo")


def test_the_merged_summary_gives_the_folders_throughput_from_every_workers_images():
    from collections import Counter

    from pasd_cli.batch.world import _from_json, _to_json

    first, second = Summary(Counter(done=2), 10.0), Summary(Counter(done=1), 8.0)
    first.add_made(4.0, (1000, 1000))
    first.add_made(4.0, (1000, 1000))
    second.add_made(6.0, (2000, 1000))
    total = merged([_from_json(json.loads(json.dumps(_to_json(s)))) for s in (first, second)])
    # 4 MP made side by side, over the longest time one worker spent making images (8 s of the first).
    assert total.throughput() == {"megapixels_per_second": 0.5, "images_per_hour": 1350.0}
