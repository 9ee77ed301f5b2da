"""`from_pretrained` of diffusers and transformers classes with our one-line model errors.
Imports nothing heavy itself, so callers that load lazily stay lazy."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelError


def from_pretrained(loader, folder: Path, **kwargs):
    try:
        return loader.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load {folder}: {first_line}") from None
