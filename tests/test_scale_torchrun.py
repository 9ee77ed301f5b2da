"""Workers started together: `torchrun ... -m pasd_cli` on one and on two "nodes" (loopback,
gloo, the tiny model on the CPU), a worker killed outright and the same command run again, and
a dead peer that must not hang the others."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from scale_jobs import FAST, MODEL, free_port, make_photos, outputs, records

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _upscale(photos: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "pasd_cli", "upscale", str(photos), "-o", str(out), *FAST, *MODEL, "--json", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _check_one_merged_run(stdout: str, photos: Path, out: Path, unsharded: Path) -> None:
    images, summaries = records(stdout)
    inputs = sorted(r["input"] for r in images)
    assert inputs == sorted(str(p) for p in photos.iterdir())  # every image exactly once
    assert {r["status"] for r in images} == {"done"}
    assert len(summaries) == 1  # one merged summary, from rank 0
    summary = summaries[0]
    assert summary["total"] == summary["done"] == len(inputs) and summary["workers"] == 2
    expected = outputs(unsharded)
    assert outputs(out).keys() == expected.keys()
    for name, image in outputs(out).items():
        assert (image == expected[name]).all(), name


def test_torchrun_two_workers_do_every_image_once_with_one_summary(scale_photos, scale_unsharded, tmp_path):
    """Must-show 2: torchrun --nproc-per-node 2 -m pasd_cli upscale DIR -o OUT --json."""
    out = tmp_path / "out"
    launch = [*TORCHRUN, "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run(
        [*launch, *_upscale(scale_photos / "good", out)], capture_output=True, text=True, timeout=400, env=_env()
    )
    assert proc.returncode == 0, proc.stderr
    _check_one_merged_run(proc.stdout, scale_photos / "good", out, scale_unsharded)


@pytest.mark.slow
def test_two_nodes_on_loopback_with_c10d_rendezvous(scale_photos, scale_unsharded, tmp_path):
    """Must-show 3: --nnodes 2 --rdzv-backend c10d, both "nodes" on 127.0.0.1."""
    out = tmp_path / "out"
    launch = [
        *TORCHRUN,
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
        "--rdzv-id",
        f"pasd-{os.getpid()}",
    ]
    command = [*launch, *_upscale(scale_photos / "good", out)]
    nodes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        for _ in range(2)
    ]
    results = [node.communicate(timeout=400) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err for _, err in results]
    _check_one_merged_run("".join(out for out, _ in results), scale_photos / "good", out, scale_unsharded)


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_worker_killed_mid_run_then_the_same_command_gives_every_output_once(tmp_path):
    """Must-show 4: SIGKILL one worker mid-run; the same command again finishes exactly what is
    missing, every output decodes, and no temporary file is left."""
    photos = tmp_path / "in"
    make_photos(photos, 16, size=24)
    out = tmp_path / "out"
    command = [*TORCHRUN, "--standalone", "--nproc-per-node", "2", *_upscale(photos, out, "--steps", "2")]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    launcher = psutil.Process(first.pid)
    _wait_for(lambda: out.exists() and any(p.suffix == ".png" for p in out.iterdir()), 300, "a first output")
    workers = launcher.children()
    assert len(workers) == 2
    workers[0].send_signal(signal.SIGKILL)
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode != 0, stderr  # torchrun reports the lost worker
    done_first = {r["input"] for r in records(stdout)[0] if r["status"] == "done"}
    assert len(done_first) < 16  # it was stopped mid-run

    again = subprocess.run(command, capture_output=True, text=True, timeout=400, env=_env())
    assert again.returncode == 0, again.stderr
    images, summaries = records(again.stdout)
    assert sorted(r["input"] for r in images) == sorted(str(p) for p in photos.iterdir())
    done_again = {r["input"] for r in images if r["status"] == "done"}
    assert not done_again & done_first  # nothing done twice
    assert {r["status"] for r in images if r["input"] not in done_again} == {"skipped"}
    assert len(summaries) == 1 and summaries[0]["done"] + summaries[0]["skipped"] == 16
    written = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert written == sorted(p.name for p in photos.iterdir())  # each output once, no other file
    assert len(outputs(out)) == 16  # each one decodes
    assert not [p for p in out.iterdir() if p.name.endswith(".part")]


@pytest.mark.slow
def test_a_dead_peer_does_not_hang_the_others(scale_photos, tmp_path):
    """Without torchrun's agent to stop the others (e.g. a lost machine): workers started with
    torchrun's variables; one is killed, the other gives up after --peer-timeout, reports its own
    summary and exits 4; the same commands again finish the folder."""
    out = tmp_path / "out"
    port = free_port()

    def start(rank: int) -> subprocess.Popen:
        env = {**_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        command = [sys.executable, *_upscale(scale_photos / "good", out, "--peer-timeout", "5")]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    survivor, victim = start(0), start(1)
    assert victim.stdout is not None
    victim.stdout.readline()  # its first record: it is working
    victim.send_signal(signal.SIGKILL)
    began = time.monotonic()
    stdout, stderr = survivor.communicate(timeout=300)
    victim.wait()
    assert survivor.returncode == 4, stderr
    assert time.monotonic() - began < 120
    assert "worker 1" in stderr and "hint: run the same command again" in stderr
    images, summaries = records(stdout)
    assert len(summaries) == 1 and summaries[0]["total"] == len(images)  # its own counts

    workers = [start(0), start(1)]
    results = [worker.communicate(timeout=300) for worker in workers]
    assert [w.returncode for w in workers] == [0, 0], [err for _, err in results]
    summaries = records("".join(o for o, _ in results))[1]
    assert len(summaries) == 1 and summaries[0]["done"] + summaries[0]["skipped"] == 9
    assert len(outputs(out)) == 9
