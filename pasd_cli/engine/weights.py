"""Read a state dict from a weights file: safetensors always, pickles only when the caller trusts them.

A pickle (`.ckpt`, `.pt`, `.bin`, ...) can run arbitrary code while it is read, so it is refused
before the file is even opened unless `trust_pickle` is set; then torch's restricted unpickler
(`weights_only=True`) reads it, which rebuilds tensors and plain containers and nothing else.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ModelError, first_line
from .formats import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, refuse_untrusted_pickle


def _tensors_only(obj, path: Path) -> dict[str, torch.Tensor]:
    # Training checkpoints wrap the weights ({"state_dict": ..., "global_step": ...}).
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelError(f"{path} holds a {type(obj).__name__}, not a dictionary of weights")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def read_state_dict(path: Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor in the file, on the CPU, keyed by name."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
        raise ModelError(f"{path}: unknown weights format {suffix or '(no suffix)'}", hint="use a .safetensors file")
    refuse_untrusted_pickle(path, trust_pickle)
    if not path.is_file():
        raise ModelError(f"weights file not found: {path}")
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises several types for a damaged file
            raise ModelError(f"cannot read {path}: {first_line(exc)}") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for forbidden globals, RuntimeError for bad zips
        raise ModelError(
            f"restricted unpickling refused {path}: {first_line(exc)}",
            hint="convert the file to .safetensors with the tool that made it",
        ) from None
    state = _tensors_only(obj, path)
    if not state:
        raise ModelError(f"{path} holds no tensors")
    return state
