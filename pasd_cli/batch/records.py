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
    # The images made: their seconds (each from reading it to writing its output; the model's
    # load apart) and their output megapixels, for the throughput.
    made_seconds: float = 0.0
    made_megapixels: float = 0.0

    def add_made(self, seconds: float, output_size: Size) -> None:
        self.made_seconds += seconds
        self.made_megapixels += output_size[0] * output_size[1] / 1e6

    def throughput(self) -> dict[str, float | None]:
        """Output megapixels per second and images per hour of the images made (None: none)."""
        made = self.counts[DONE]
        if not made or self.made_seconds <= 0:
            return {"megapixels_per_second": None, "images_per_hour": None}
        return {
            "megapixels_per_second": float(f"{self.made_megapixels / self.made_seconds:.4g}"),
            "images_per_hour": float(f"{made * 3600 / self.made_seconds:.4g}"),
        }

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
            **self.throughput(),
            "error": self.error,
        }
        summary.update(self.extra)
        return summary
