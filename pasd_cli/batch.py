"""Finding inputs, planning outputs, and running the model over them."""

from __future__ import annotations

from pathlib import Path

from .errors import UsageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"}


def find_inputs(spec: str) -> list[Path]:
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.iterdir()
                      if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    raise UsageError(f"{spec}: no such file or folder")


def output_path(source: Path, out_dir: Path) -> Path:
    return out_dir / f"{source.stem}.png"
