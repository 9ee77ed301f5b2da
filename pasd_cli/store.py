"""Where models live: resolving a `--pasd` / `--base` argument to a local folder."""

from __future__ import annotations

from pathlib import Path

from .errors import ModelError


def resolve_model(spec: str | None, role: str) -> Path:
    """A local folder for `spec`; `role` names the option for messages ("--pasd", "--base")."""
    if not spec:
        raise ModelError(f"no model given for {role}", hint=f"pass {role} PATH")
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    raise ModelError(f"{role} {spec}: folder not found")
