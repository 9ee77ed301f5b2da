"""Half-precision weights computed in float32: each layer's weights are kept as the file stores
them (float16 or bfloat16) and widened for the moment the layer runs.

Widening a float16 or bfloat16 number to float32 gives the very same number, so a layer computes
exactly what it computes with float32 weights read from the same file: the output is identical,
while the weights take half the memory and loading skips the conversion. It pays where float32 is
the compute dtype because half-precision arithmetic is slow (CPUs without bf16 matrix
instructions). The per-layer widening is diffusers' layerwise casting hook, changed in where the
widened weights go (below).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

HALF_DTYPES = frozenset({torch.float16, torch.bfloat16})
# Offsets into the scratch buffer are rounded up to this many elements (64 bytes in float32), so
# each widened tensor starts as aligned as a fresh allocation's data would for the kernels.
_ALIGN = 16
_WIDENED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class Scratch:
    """One buffer in the compute dtype that every widened layer writes its weights into, in turn.
    A fresh float32 copy of each layer at each forward would allocate the networks' float32 size at
    every step (6 GB at SD size), as fresh mappings the system must fault in and zero. Layers run
    one at a time, so one buffer the size of the largest serves them all (59 MB at SD size); it is
    what the widening costs in memory."""

    def __init__(self, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.buffer = torch.empty(0, dtype=dtype, device=device)

    @staticmethod
    def need(tensors) -> int:
        return sum(-(-t.numel() // _ALIGN) * _ALIGN for t in tensors)

    def reserve(self, numel: int, device: torch.device) -> None:
        if numel > self.buffer.numel() or self.buffer.device != device:
            self.buffer = torch.empty(max(numel, self.buffer.numel()), dtype=self.buffer.dtype, device=device)

    def widen(self, tensors) -> list[torch.Tensor]:
        """Each of `tensors` copied into the buffer, in the buffer's dtype."""
        out, offset = [], 0
        for tensor in tensors:
            n = tensor.numel()
            out.append(self.buffer[offset : offset + n].view(tensor.shape).copy_(tensor))
            offset += -(-n // _ALIGN) * _ALIGN
        return out


@functools.cache
def _hook_classes():
    """(the hook of layers whose weights are widened, the hook of embeddings). Both are diffusers'
    layerwise casting hook, except that the layer keeps its own half-precision tensors: diffusers'
    rounds the widened weights back into new tensors after each forward, which re-allocated every
    weight per forward and fragmented the heap (the resident memory grew by 0.7 GB over one
    SD-size image)."""
    from diffusers.hooks.layerwise_casting import LayerwiseCastingHook

    class WideningHook(LayerwiseCastingHook):
        def __init__(self, storage_dtype: torch.dtype, compute_dtype: torch.dtype, scratch: Scratch):
            super().__init__(storage_dtype, compute_dtype, non_blocking=False)
            self.scratch = scratch
            self.kept: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, its own data)

        def pre_forward(self, module: nn.Module, *args, **kwargs):
            # A forward that raised (out of memory, then retried smaller) never reached
            # post_forward: its own tensors go back first, or the layer would keep the scratch
            # buffer, which the next layers overwrite, as its weights.
            self.post_forward(module, None)
            self.kept = [(t, t.data) for t in _direct_tensors(module)]
            for (tensor, _), wide in zip(self.kept, self.scratch.widen([data for _, data in self.kept])):
                tensor.data = wide
            return args, kwargs

        def post_forward(self, module: nn.Module, output):
            for tensor, data in self.kept:
                tensor.data = data
            self.kept = []
            return output

    class EmbeddingHook(LayerwiseCastingHook):
        """A lookup only copies rows: looked up in half precision and then widened, it gives the
        same numbers without widening the whole table (the text encoder's is 38M entries)."""

        def pre_forward(self, module: nn.Module, *args, **kwargs):
            return args, kwargs

        def post_forward(self, module: nn.Module, output):
            return output.to(self.compute_dtype)

    return WideningHook, EmbeddingHook


def _direct_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [t for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)) if t.is_floating_point()]


def widen_per_layer(model: nn.Module, compute_dtype: torch.dtype, scratch: Scratch | None = None) -> int:
    """Layers (linear, convolution, embedding) whose weights are all in one half dtype keep them
    and widen them to `compute_dtype` as they run, into `scratch` (shared by the models that run
    one at a time; default: the model's own); every other floating-point tensor (norms, layers
    merged in float32 or read from a float32 file) is cast to `compute_dtype` now. Returns the
    number of layers kept half: none when `compute_dtype` is itself half."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.layerwise_casting import _LAYERWISE_CASTING_HOOK

    if scratch is None or scratch.buffer.dtype != compute_dtype:
        scratch = Scratch(compute_dtype)
    kept = 0
    with torch.inference_mode(False), torch.no_grad():
        for module in model.modules():
            tensors = _direct_tensors(module)
            dtypes = {t.dtype for t in tensors}
            if (
                compute_dtype not in HALF_DTYPES
                and isinstance(module, (*_WIDENED, nn.Embedding))
                and len(dtypes) == 1
                and dtypes <= HALF_DTYPES
            ):
                widening, embedding = _hook_classes()
                if isinstance(module, nn.Embedding):
                    hook = embedding(dtypes.pop(), compute_dtype, non_blocking=False)
                else:
                    hook = widening(dtypes.pop(), compute_dtype, scratch)
                    scratch.reserve(Scratch.need(tensors), tensors[0].device)
                # Registered under the library's name, so that diffusers sees the compute dtype
                # (ModelMixin.dtype) as with its own hook.
                HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, _LAYERWISE_CASTING_HOOK)
                kept += 1
                continue
            for tensor in tensors:
                if tensor.dtype != compute_dtype:
                    tensor.data = tensor.data.to(compute_dtype)
    return kept


def stored_bytes(model: nn.Module) -> int:
    """What the model's parameters and buffers take, in the dtypes they are kept in."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
