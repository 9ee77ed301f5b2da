"""`--shard I/N`: one worker's share of a planned batch, so that N workers (a Slurm array, a
Kubernetes indexed job, torchrun's ranks) split one folder with no coordinator.

Every worker plans the whole batch (skips, collisions and the failure memory see every input),
then keeps the jobs it owns. A job's owner depends only on its output path relative to -o (its
input's place when it has no output) and on N: the same on every machine whatever the folders
are mounted as, and unchanged when images are added. Jump consistent hashing (Lamping and Veach,
2014) also keeps all but 1/N of the jobs where they were when N grows to N + 1.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .plan import Job, Plan

_SPEC = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count}: the index must be in [0, {self.count})")

    @classmethod
    def parse(cls, spec: str) -> Shard:
        """ "1/4" -> Shard(1, 4)."""
        match = _SPEC.fullmatch(spec)
        if not match:
            raise ValueError(f"shard {spec!r}: expected I/N, e.g. 0/4")
        return cls(int(match[1]), int(match[2]))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, job: Job, out_dir: Path | None) -> bool:
        return owner(job_key(job, out_dir), self.count) == self.index

    def share(self, plan: Plan, out_dir: Path | None) -> Plan:
        """The jobs this worker owns, in the plan's order; the collisions stay the whole plan's."""
        return Plan([job for job in plan.jobs if self.owns(job, out_dir)], plan.collisions)

    def lock_path(self, path: str) -> str:
        """`--lock FILE` holds one run of this shard at a time: the other shards run beside it."""
        return f"{path}.{self.index}-of-{self.count}"


def job_key(job: Job, out_dir: Path | None) -> str:
    """What decides a job's owner: its output path below -o, else its input's place below its
    root (an input that failed or was skipped before it got an output)."""
    if job.output is not None and out_dir is not None:
        return Path(os.path.relpath(job.output, out_dir)).as_posix()
    return job.rel.as_posix()


def owner(key: str, count: int) -> int:
    """The shard in [0, count) that owns `key`: a stable hash (not Python's, which is salted per
    process), then jump consistent hashing."""
    value = int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()[:8], "big")
    bucket, candidate = -1, 0
    while candidate < count:
        bucket = candidate
        value = (value * 2862933555777941757 + 1) % 2**64
        candidate = int((bucket + 1) * (2**31 / ((value >> 33) + 1)))
    return bucket
