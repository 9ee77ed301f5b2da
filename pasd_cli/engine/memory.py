"""Retrying a stage with smaller tiles when the device runs out of memory."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from ..errors import DeviceError

T = TypeVar("T")
Warn = Callable[[str], None]


# Errors that mean "this tensor or pass is too large for the device" rather than a bug, matched
# lower-case in the message. A smaller tile cures each of them:
# - out of memory: CUDA's torch.OutOfMemoryError carries it, MPS says it in a RuntimeError;
# - cuBLAS and cuDNN failing to allocate their workspace, and cuDNN refusing a convolution
#   too large for its kernels (CUDNN_STATUS_NOT_SUPPORTED / INTERNAL_ERROR, or the v8/v9 API's
#   "unable to find an engine"), which large activations provoke long before memory runs out;
# - kernels that index with 32-bit integers refusing a tensor of 2^31 elements or more;
# - MPS refusing a tensor above Metal's largest buffer ("Invalid buffer size: 19.45 GB", e.g. an
#   attention score matrix) or above its 32-bit sizes.
_MEMORY_LIKE_ERRORS = (
    "out of memory",
    "cublas_status_alloc_failed",
    "cudnn_status_",
    "unable to find an engine",
    "32-bit index math",
    "canuse32bitindexmath",
    "int32_t max",
    "less than int_max elements",
    "invalid buffer size",
    "currently supported by the mps backend",
    "larger than int_max",
)


def is_out_of_memory(exc: BaseException) -> bool:
    """Out of memory, or an error that a smaller tile avoids as surely (see above)."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and any(text in str(exc).lower() for text in _MEMORY_LIKE_ERRORS)
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
        self,
        stage: Callable[[int], T],
        tile: int,
        whole: int,
        minimum: int,
        what: str,
        changes_result: bool = False,
        relieve: Callable[[], str | None] | None = None,
    ) -> tuple[T, int]:
        """`stage(tile)`; `tile` <= 0 or >= `whole` means untiled. Returns (result, tile used).
        `relieve`, after a failure, may first make the stage hold less at the same tile (e.g.
        fewer tiles a pass): it says how ("one latent tile a pass"), or None where it cannot."""
        while True:
            failed = False
            try:
                return stage(tile), tile
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not is_out_of_memory(exc):
                    raise
                failed = True  # retry outside the handler, so the traceback's tensors are freed
            if failed:
                free_device_cache(self.device)
                relief = relieve() if relieve else None
                if relief is not None:
                    # Said apart from the once-per-image warning: a smaller tile may still follow,
                    # and that one changes the result, so it must not go unsaid.
                    if self.warn:
                        self.warn(f"out of memory on {self.device.type}; retrying with {relief}")
                    continue
                current = whole if tile <= 0 or tile >= whole else tile
                smaller = current // 2
                if smaller < minimum:
                    raise DeviceError(
                        f"out of memory on {self.device.type} even with {what} tiles of {current}",
                        hint="close other programs using the device, or ask for a smaller output",
                        field="scale",
                    )
                note = "; the result will differ slightly from the requested tiling" if changes_result else ""
                self._warn(
                    f"out of memory on {self.device.type}; retrying with smaller tiles ({what} tile {smaller}){note}"
                )
                tile = smaller

    def _warn(self, message: str) -> None:
        if self.warn and not self.warned:
            self.warn(message)
            self.warned = True
