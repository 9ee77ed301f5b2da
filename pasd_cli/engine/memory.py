"""Retrying a stage with smaller tiles when the device runs out of memory."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from ..errors import DeviceError

T = TypeVar("T")
Warn = Callable[[str], None]


# What MPS says in a RuntimeError: out of memory, or one tensor above Metal's largest buffer
# ("Invalid buffer size: 19.45 GB", e.g. an attention score matrix); smaller tiles cure both.
_MPS_MEMORY_ERRORS = ("out of memory", "invalid buffer size")


def is_out_of_memory(exc: BaseException) -> bool:
    # CUDA raises torch.OutOfMemoryError.
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and any(text in str(exc).lower() for text in _MPS_MEMORY_ERRORS)
    )


def free_device_cache(device: torch.device) -> None:
    """Hand the allocator's cached blocks back to the device, for the next attempt or model."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


class TileShrinker:
    """Runs a stage at a tile size; after an out-of-memory error halves the tile and runs it
    again, until it fits or the tile reaches its minimum. Warns once per image (the first time),
    through `warn`; the engine itself never prints."""

    def __init__(self, device: torch.device, warn: Warn | None = None):
        self.device = torch.device(device)
        self.warn = warn
        self.warned = False

    def run(
        self, stage: Callable[[int], T], tile: int, whole: int, minimum: int, what: str, changes_result: bool = False
    ) -> tuple[T, int]:
        """`stage(tile)`; `tile` <= 0 or >= `whole` means untiled. Returns (result, tile used)."""
        while True:
            failed = False
            try:
                return stage(tile), tile
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not is_out_of_memory(exc):
                    raise
                failed = True  # retry outside the handler, so the traceback's tensors are freed
            if failed:
                current = whole if tile <= 0 or tile >= whole else tile
                smaller = current // 2
                free_device_cache(self.device)
                if smaller < minimum:
                    raise DeviceError(
                        f"out of memory on {self.device.type} even with {what} tiles of {current}",
                        hint="close other programs using the device, or ask for a smaller output",
                        field="scale",
                    )
                if self.warn and not self.warned:
                    note = "; the result will differ slightly from the requested tiling" if changes_result else ""
                    self.warn(
                        f"out of memory on {self.device.type}; retrying with smaller tiles "
                        f"({what} tile {smaller}){note}"
                    )
                    self.warned = True
                tile = smaller
