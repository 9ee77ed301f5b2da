"""`from_pretrained` of diffusers and transformers classes with our one-line model errors.
Imports nothing heavy itself, so callers that load lazily stay lazy."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelError, first_line


def from_pretrained(loader, folder: Path, **kwargs):
    try:
        return loader.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"cannot load {folder}: {first_line(exc)}") from None
