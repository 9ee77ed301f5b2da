"""Faults injected in-process: an overflowing UNet, as a merged base or LoRA can make one."""

from __future__ import annotations

import torch

from pasd_cli.nn.unet import PASDUNet


def poison_unet(monkeypatch, dtypes, value: float = float("inf")) -> list[torch.dtype]:
    """Every PASD UNet's prediction becomes `value` when it runs in one of `dtypes`. Returns the
    dtypes it ran in, one per call."""
    original = PASDUNet.forward
    calls: list[torch.dtype] = []

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls.append(self.dtype)
        if self.dtype not in dtypes:
            return out
        poisoned = torch.full_like(out[0], value)
        return (poisoned, *out[1:]) if isinstance(out, tuple) else type(out)(sample=poisoned)

    monkeypatch.setattr(PASDUNet, "forward", forward)
    return calls
