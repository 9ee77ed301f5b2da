"""What a batch reports: one record per input, and a summary."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .plan import CANCELLED, COLLISION, DONE, FAILED, FAILING, INTERRUPTED, PLANNED, SKIPPED, Size


@dataclass
class JobResult:
    """What a command returns for a finished job; `extra` goes into the JSON record (e.g. prompt)."""

    output_size: Size
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobRecord:
    input: str
    output: str | None
    status: str
    reason: str | None = None
    seconds: float | None = None
    input_size: Size | None = None
    output_size: Size | None = None
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # command-specific fields, e.g. "prompt"

    def to_json(self) -> dict[str, Any]:
        record = {
            "type": "image",
            "input": self.input,
            "output": self.output,
            "status": self.status,
            "reason": self.reason,
            "seconds": None if self.seconds is None else round(self.seconds, 3),
            "input_size": list(self.input_size) if self.input_size else None,
            "output_size": list(self.output_size) if self.output_size else None,
            "seed": self.seed,
        }
        record.update(self.extra)
        return record


@dataclass
class Summary:
    counts: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    error: str | None = None  # the fatal error that stopped the batch
    extra: dict[str, Any] = field(default_factory=dict)  # counters commands add (e.g. caption cache hits)

    @property
    def exit_code(self) -> int:
        return 1 if any(self.counts[status] for status in FAILING) else 0

    def to_json(self) -> dict[str, Any]:
        statuses = (DONE, SKIPPED, FAILED, PLANNED, COLLISION, CANCELLED, INTERRUPTED)
        summary: dict[str, Any] = {
            "type": "summary",
            "total": sum(self.counts.values()),
            **{status: self.counts[status] for status in statuses},
            "seconds": round(self.seconds, 3),
            "error": self.error,
        }
        summary.update(self.extra)
        return summary
