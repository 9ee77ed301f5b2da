"""The batch runner's pre-pass (`Command.prepass`): what a command prepares for every job before
its model loads (captions). No model: the command's work only records what it was given."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from pasd_cli.batch.command import Command
from pasd_cli.batch.failures import FailureLog
from pasd_cli.batch.plan import DONE, FAILED, SKIPPED, Job, Plan
from pasd_cli.batch.records import JobResult
from pasd_cli.batch.report import Reporter
from pasd_cli.batch.runner import execute
from pasd_cli.batch.settings import BatchSettings
from pasd_cli.errors import InputError, ModelError


def plan_of(tmp_path: Path, names: str) -> Plan:
    jobs = []
    for name in names:
        source = tmp_path / f"{name}.png"
        source.write_bytes(name.encode())
        jobs.append(Job(source, Path(source.name), found=True, output=tmp_path / "out" / source.name))
    jobs.append(Job(tmp_path / "old.png", Path("old.png"), True, status=SKIPPED, reason="output exists"))
    return Plan(jobs)


class Recorder(Command):
    """A command without a model: its pre-pass is the one under test, its work echoes the
    pre-pass's prompt."""

    def __init__(self, prepass):
        self._prepass = prepass
        self.loaded = []

    @property
    def seed(self):
        return None

    def name_fields(self):
        return {}

    def prepass(self, pending):
        self._prepass(pending)

    def load(self, reporter):
        self.loaded.append(True)

    def work(self, job, progress):
        return JobResult((1, 1), {"prompt": job.extra["prompt"].upper(), "worker": 1})


def run(tmp_path, plan, prepass, fail_fast=False, dry_run=False):
    stdout = io.StringIO()
    reporter = Reporter(json_lines=True, stdout=stdout, stderr=io.StringIO(), live=False)
    options = BatchSettings(output=str(tmp_path / "out"), fail_fast=fail_fast, dry_run=dry_run, json=True)
    failures = FailureLog(tmp_path / "out")
    command = Recorder(prepass)
    try:
        execute(command, plan, reporter, options, failures=failures)
    except ModelError:
        pass
    lines = [json.loads(line) for line in stdout.getvalue().splitlines()]
    return {Path(r["input"]).stem: r for r in lines[:-1]}, lines[-1], failures, command.loaded


class Describe:
    """Gives a, c, ... a prompt; fails b (a bad sidecar: not remembered) and d (a bad image)."""

    def __init__(self):
        self.seen: list[str] = []

    def __call__(self, pending):
        for job in pending.jobs:
            self.seen.append(job.source.stem)
            if job.source.stem in "bd":
                error = InputError(f"{job.source}: unusable")
                if pending.fail(job, error, remember=job.source.stem == "d"):
                    return
                continue
            job.extra["prompt"] = f"prompt {job.source.stem}"
        pending.summary.extra["described"] = len(self.seen)
        assert [j.source.stem for j in pending.plan.jobs][-1] == "old"  # the whole plan is there too


def test_prepass_sees_the_pending_jobs_before_the_model_loads(tmp_path):
    describe = Describe()
    records, summary, failures, loaded = run(tmp_path, plan_of(tmp_path, "abcd"), describe)
    assert describe.seen == ["a", "b", "c", "d"] and loaded == [True]
    assert {k: r["status"] for k, r in records.items()} == {
        "a": DONE,
        "b": FAILED,
        "c": DONE,
        "d": FAILED,
        "old": SKIPPED,
    }
    assert records["b"]["reason"] == "unusable"  # without the path, as worker failures
    # The pre-pass's fields reach the record; the worker's win where both give one.
    assert records["a"]["prompt"] == "PROMPT A" and records["a"]["worker"] == 1
    assert summary["described"] == 4 and summary["failed"] == 2
    assert failures.known(tmp_path / "d.png") == "unusable" and failures.known(tmp_path / "b.png") is None


def test_fail_fast_stops_the_prepass_and_the_batch(tmp_path):
    describe = Describe()
    records, summary, _, _ = run(tmp_path, plan_of(tmp_path, "abc"), describe, fail_fast=True)
    assert describe.seen == ["a", "b"]
    assert [records[k]["status"] for k in "abc"] == [DONE, FAILED, "cancelled"]


def test_dry_run_records_carry_the_prepass_fields(tmp_path):
    records, _, _, loaded = run(tmp_path, plan_of(tmp_path, "a"), Describe(), dry_run=True)
    assert records["a"]["status"] == "planned" and records["a"]["prompt"] == "prompt a" and not loaded


def test_nothing_to_do_no_prepass_and_a_fatal_prepass_cancels_everything(tmp_path):
    plan = Plan([Job(tmp_path / "old.png", Path("old.png"), True, status=SKIPPED, reason="output exists")])
    run(tmp_path, plan, lambda pending: pytest.fail("called with nothing to do"))

    def missing_model(pending):
        raise ModelError("the captioner is not available")

    records, summary, _, loaded = run(tmp_path, plan_of(tmp_path, "ab"), missing_model)
    assert [records[k]["status"] for k in "ab"] == ["cancelled", "cancelled"] and not loaded
    assert summary["error"] == "the captioner is not available"
