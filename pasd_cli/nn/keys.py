"""Reading a safetensors header without torch, so that callers can check a file cheaply."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelError, first_line


def read_keys(path: Path) -> list[str]:
    """The tensor names in a safetensors file's header; the tensors are not read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            return list(handle.keys())
    except Exception as exc:  # safetensors raises several types for a damaged header
        raise ModelError(f"cannot read {path}: {first_line(exc)}") from None
