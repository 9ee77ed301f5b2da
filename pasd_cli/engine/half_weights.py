"""Half-precision weights computed in float32: each layer's weights are kept as the file stores
them (float16 or bfloat16) and widened for the moment the layer runs.

Widening a float16 or bfloat16 number to float32 gives the very same number, so a layer computes
exactly what it computes with float32 weights read from the same file: the output is identical,
while the weights take half the memory and loading skips the conversion. It pays where float32 is
the compute dtype because half-precision arithmetic is slow (CPUs without bf16 matrix
instructions). The per-layer widening is diffusers' layerwise casting hook.
"""

from __future__ import annotations

import torch
from torch import nn

HALF_DTYPES = frozenset({torch.float16, torch.bfloat16})


def _direct_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [t for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)) if t.is_floating_point()]


def widen_per_layer(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """Layers (linear, convolution, embedding) whose weights are all in one half dtype keep them
    and widen them to `compute_dtype` as they run; every other floating-point tensor (norms, layers
    merged in float32 or read from a float32 file) is cast to `compute_dtype` now. Returns the
    number of layers kept half. A no-op kept-half count of 0 when `compute_dtype` is itself half."""
    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS
    from diffusers.hooks.layerwise_casting import apply_layerwise_casting_hook

    kept = 0
    with torch.inference_mode(False), torch.no_grad():
        for module in model.modules():
            tensors = _direct_tensors(module)
            dtypes = {t.dtype for t in tensors}
            if (
                compute_dtype not in HALF_DTYPES
                and isinstance(module, _GO_LC_SUPPORTED_PYTORCH_LAYERS)
                and len(dtypes) == 1
                and dtypes <= HALF_DTYPES
            ):
                apply_layerwise_casting_hook(module, dtypes.pop(), compute_dtype, non_blocking=False)
                kept += 1
                continue
            for tensor in tensors:
                if tensor.dtype != compute_dtype:
                    tensor.data = tensor.data.to(compute_dtype)
    return kept


def stored_bytes(model: nn.Module) -> int:
    """What the model's parameters and buffers take, in the dtypes they are kept in."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
