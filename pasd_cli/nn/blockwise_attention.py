"""Attention over many keys on the CPU in bfloat16, as blocks of queries through oneDNN matmuls.

torch's CPU flash-attention kernel runs bfloat16 at about 150 GFLOP/s on an AVX512-BF16 CPU
without AMX, at SD 1.5's head size of 40: a sixth of what oneDNN's bfloat16 matmuls reach there.
Over 4096 tokens (a 64x64 latent) it took 58% of a denoising step. Scores, softmax and values for
256 queries at a time, a block whose scores stay in cache, take 0.45x its time at 4096 keys and
0.4x at 1024; below 256 keys the kernel is as fast or faster and keeps them.

The price: the scores are rounded to bfloat16 before the softmax, where the kernel keeps them in
float32. Against float32 attention that doubles the kernel's deviation (tests/test_blockwise_attention.py
bounds it); the benchmark reports what it does to whole images, in levels.

`BlockwiseAttention` routes `F.scaled_dot_product_attention` calls made while it is active, by
diffusers' attention processors and PASD's pixel-aware attention alike, so no processor is copied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# Queries per block: 256 x 4096 bfloat16 scores are 2 MiB a head.
QUERY_BLOCK = 256
# Fewer keys than this: torch's kernel is as fast (measured at 77 keys, SD's text tokens).
MIN_KEYS = 256


def sdpa_arguments(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False
) -> dict:
    """F.scaled_dot_product_attention's arguments by name, however they were passed."""
    return locals()


def blockwise_applies(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> bool:
    tensors = (query, key, value)
    return (
        all(isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.dtype == torch.bfloat16 for t in tensors)
        and query.dim() == key.dim() == value.dim() >= 3
        and query.shape[:-2] == key.shape[:-2] == value.shape[:-2]
        and key.shape[-2] >= MIN_KEYS
        and attn_mask is None
        and dropout_p == 0.0
        and not is_causal
        and not enable_gqa
        and not torch.is_grad_enabled()
    )


def blockwise_attention(query, key, value, scale: float | None = None, heads_per_block: int = 2) -> torch.Tensor:
    """softmax(query keyᵀ x scale) value over (..., tokens, channels) tensors, the leading dims
    being batch and heads; the result has query's leading dims and value's channels."""
    *lead, length, dim = query.shape
    keys = key.shape[-2]
    scale = dim**-0.5 if scale is None else scale
    q = query.reshape(-1, length, dim)
    k_t = key.reshape(-1, keys, dim).transpose(1, 2)
    v = value.reshape(-1, keys, value.shape[-1])
    out = query.new_empty(q.shape[0], length, v.shape[-1])
    scores = query.new_empty(heads_per_block, min(QUERY_BLOCK, length), keys)
    for first in range(0, q.shape[0], heads_per_block):
        heads = slice(first, first + heads_per_block)
        for start in range(0, length, QUERY_BLOCK):
            rows = slice(start, start + QUERY_BLOCK)
            block = q[heads, rows]
            s = scores[: block.shape[0], : block.shape[1]]
            # alpha scales inside the matmul, in float32, before the one rounding to bfloat16.
            torch.baddbmm(s, block, k_t[heads], beta=0, alpha=scale, out=s)
            torch.bmm(torch.softmax(s, dim=-1), v[heads], out=out[heads, rows])
    return out.reshape(*lead, length, v.shape[-1])


class BlockwiseAttention(TorchFunctionMode):
    """While active, CPU bfloat16 attention over `MIN_KEYS` or more keys runs blockwise; every
    other call (masks, dropout, other dtypes and devices) goes to torch unchanged."""

    def __init__(self, heads_per_block: int | None = None):
        super().__init__()
        # As many heads per matmul as threads: each thread then has a head's block to itself.
        self.heads_per_block = heads_per_block or max(2, torch.get_num_threads())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            call = sdpa_arguments(*args, **kwargs)
            if blockwise_applies(**call):
                query, key, value = call["query"], call["key"], call["value"]
                return blockwise_attention(query, key, value, call["scale"], self.heads_per_block)
        return func(*args, **kwargs)
