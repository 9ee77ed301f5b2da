"""The batch and output settings every image command shares: what the batch options give."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..imageio import OUTPUT_FORMATS
from .sizes import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:
    from .shard import Shard
    from .world import World

FORMATS = (*OUTPUT_FORMATS, "same")
ON_EXISTS = ("skip", "if-stale", "overwrite", "error")


@dataclass(frozen=True)
class BatchSettings:
    inputs: tuple[str, ...] = ()
    output: str = ""  # a folder, or "-" for stdout
    recursive: bool = False
    name: str = "{stem}"
    format: str = "png"
    quality: int | None = None
    on_exists: str = "skip"
    retry_failed: bool = False
    fail_fast: bool = False
    json: bool = False
    dry_run: bool = False
    verbosity: int = 1  # 0 quiet, 1 normal, 2 verbose
    lock: str | None = None  # with a shard: one lock per shard
    shard: Shard | None = None  # this worker's share of the plan (None: all of it)
    world: World | None = None  # the workers started together with this one (torchrun), if any
    max_pixels: int = DEFAULT_MAX_PIXELS  # of a job's output and of its working image

    def __post_init__(self) -> None:
        checks = [
            (self.format in FORMATS, f"format must be one of {', '.join(FORMATS)}"),
            (self.on_exists in ON_EXISTS, f"--on-exists must be one of {', '.join(ON_EXISTS)}"),
            (self.quality is None or 1 <= self.quality <= 100, f"--quality {self.quality}: must be in [1, 100]"),
            (self.inputs.count("-") <= 1, "'-' (paths from stdin) may be given once"),
            (not (self.to_stdout and self.json), "-o - writes the image to stdout; it cannot be combined with --json"),
            (not (self.to_stdout and self.recursive), "-o - writes one image; --recursive makes no sense with it"),
            (self.name.strip() != "", "--name must not be empty"),
            (self.max_pixels >= 1, f"--max-pixels {self.max_pixels}: must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def to_stdout(self) -> bool:
        return self.output == "-"
