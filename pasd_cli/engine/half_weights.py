"""Half-precision weights computed in float32: each layer's weights are kept as the file stores
them (float16 or bfloat16) and widened for the moment the layer runs.

Widening a float16 or bfloat16 number to float32 gives the very same number, so a layer computes
exactly what it computes with float32 weights read from the same file: the output is identical,
while the weights take half the memory and loading skips the conversion. It pays where float32 is
the compute dtype because half-precision arithmetic is slow (CPUs without bf16 matrix
instructions). The per-layer widening is diffusers' layerwise casting hook, made to keep each
layer's own half-precision tensors.
"""

from __future__ import annotations

import torch
from torch import nn

HALF_DTYPES = frozenset({torch.float16, torch.bfloat16})


def _widening_hook(storage_dtype: torch.dtype, compute_dtype: torch.dtype):
    """diffusers' layerwise casting hook, except that after the forward the layer takes back its
    own half-precision tensors instead of a new rounding of the widened ones: the same numbers,
    but no new weight tensor per forward. Re-allocating every layer's weights at each forward
    fragmented the heap: the resident memory grew by 0.7 GB over one SD-size image."""
    from diffusers.hooks.layerwise_casting import LayerwiseCastingHook

    class WideningHook(LayerwiseCastingHook):
        def pre_forward(self, module: nn.Module, *args, **kwargs):
            self.kept = [(t, t.data) for t in _direct_tensors(module)]
            for tensor, data in self.kept:
                tensor.data = data.to(self.compute_dtype)
            return args, kwargs

        def post_forward(self, module: nn.Module, output):
            for tensor, data in self.kept:
                tensor.data = data
            self.kept = []
            return output

    return WideningHook(storage_dtype, compute_dtype, non_blocking=False)


def _direct_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [t for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)) if t.is_floating_point()]


def widen_per_layer(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """Layers (linear, convolution, embedding) whose weights are all in one half dtype keep them
    and widen them to `compute_dtype` as they run; every other floating-point tensor (norms, layers
    merged in float32 or read from a float32 file) is cast to `compute_dtype` now. Returns the
    number of layers kept half. A no-op kept-half count of 0 when `compute_dtype` is itself half."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS
    from diffusers.hooks.layerwise_casting import _LAYERWISE_CASTING_HOOK

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
                # Registered under the library's name, so that diffusers sees the compute dtype
                # (ModelMixin.dtype) as with its own hook.
                registry = HookRegistry.check_if_exists_or_initialize(module)
                registry.register_hook(_widening_hook(dtypes.pop(), compute_dtype), _LAYERWISE_CASTING_HOOK)
                kept += 1
                continue
            for tensor in tensors:
                if tensor.dtype != compute_dtype:
                    tensor.data = tensor.data.to(compute_dtype)
    return kept


def stored_bytes(model: nn.Module) -> int:
    """What the model's parameters and buffers take, in the dtypes they are kept in."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
