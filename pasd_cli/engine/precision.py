"""Non-finite results, and the safer dtypes an image is run again in.

float16 overflows easily: a merged personalized base or LoRA with large weights is enough for an
activation to pass 65504, become inf, then NaN. Decoded, such latents would be written as a
black or white image with normal metadata, so the pipeline checks its results and runs the image
again in a dtype with float32's range (bfloat16, then float32).
"""

from __future__ import annotations

import torch


class NonFiniteError(RuntimeError):
    """A result held NaN or inf; `what` names it ("latents", "decoded image")."""

    def __init__(self, what: str):
        super().__init__(f"non-finite values in the {what}")
        self.what = what


def require_finite(tensor: torch.Tensor, what: str) -> None:
    """One reduction and one host sync: called once per image and result, not per step."""
    if not bool(torch.isfinite(tensor).all()):
        raise NonFiniteError(what)


def supports_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        try:  # emulated bfloat16 (before Ampere) is too slow to fall back to
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch without the argument
            return torch.cuda.is_bf16_supported()
    if device.type == "mps":
        return torch.backends.mps.is_macos_or_newer(14, 0)
    return True


def safer_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype | None:
    """The dtype to run again in after non-finite results in `dtype`: float16 -> bfloat16 (float32's
    range at float16's cost, where the device has it) -> float32; None after float32."""
    if dtype == torch.float16 and supports_bf16(device):
        return torch.bfloat16
    if dtype != torch.float32:
        return torch.float32
    return None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
