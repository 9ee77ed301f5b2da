"""What one device can hold in a single tensor, and the tile sizes that respect it.

A memory budget bounds what a pass holds in total; these limits bound each tensor on its own,
because a tensor past them fails however much memory is free:

- CUDA: cuDNN and many CUDA kernels index with 32-bit integers, so a tensor of 2^31 elements or
  more raises a non-OOM error (the retry in `memory` catches it, but choosing a fitting tile
  first costs nothing).
- MPS: Metal Performance Shaders abort the process (an assertion, not an exception) for an array
  of more than 2^32 bytes or 2^31 elements, and MPS's scaled_dot_product_attention materialises
  the whole score matrix, batch x heads x queries x keys. Nothing can catch these, so the tiles
  must be chosen to fit before anything runs.
- CPU: 64-bit indexing; nothing short of memory.

Pure functions of sizes and configs, apart from `device_limits`, which only reads the device's
type.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# 32-bit signed indexing: the largest element count (and MPS's largest dimension).
INT32_ELEMENTS = 2**31 - 1
# Metal's largest MPSNDArray, whatever the machine's memory (torch does not expose the device's
# maxBufferLength; this is the bound its assertion enforces).
MPS_MAX_BYTES = 2**32
# Attention scores are sized as float32 whatever the network's dtype: the softmax may run in it.
SCORE_BYTES = 4


@dataclass(frozen=True)
class DeviceLimits:
    """Per-tensor limits of a device (None: no limit short of memory)."""

    max_elements: int | None = None
    max_bytes: int | None = None
    # The device's attention holds the whole score matrix in one buffer, and failing that is fatal.
    attention_materialised: bool = False

    def max_tensor_elements(self, itemsize: int) -> int | None:
        """The most elements one tensor of `itemsize`-byte values may have."""
        bounds = [b for b in (self.max_elements, self.max_bytes and self.max_bytes // itemsize) if b]
        return min(bounds) if bounds else None

    def max_tensor_bytes(self, itemsize: int) -> int | None:
        elements = self.max_tensor_elements(itemsize)
        return None if elements is None else elements * itemsize

    def fits(self, elements: int, itemsize: int) -> bool:
        largest = self.max_tensor_elements(itemsize)
        return largest is None or elements <= largest


def device_limits(device: torch.device | str) -> DeviceLimits:
    kind = torch.device(device).type
    if kind == "cuda":
        return DeviceLimits(max_elements=INT32_ELEMENTS)
    if kind == "mps":
        return DeviceLimits(max_elements=INT32_ELEMENTS, max_bytes=MPS_MAX_BYTES, attention_materialised=True)
    return DeviceLimits()


# -- latent tiles -----------------------------------------------------------------------------


def attention_heads(unet_config) -> int:
    """The most attention heads at any level of an SD UNet (its PACA layers use the same)."""
    heads = unet_config.num_attention_heads or unet_config.attention_head_dim
    return max(heads) if isinstance(heads, (list, tuple)) else int(heads)


def latent_tile_cap(limits: DeviceLimits, heads: int, batch: int) -> int | None:
    """The largest latent tile side (a multiple of 8) whose attention scores fit one buffer, or
    None where attention holds no score matrix of that size.

    At a tile of side T the UNet's and the ControlNet's full-resolution self-attention, and full
    PASD's pixel-to-pixel attention (decoder pixels to control pixels), each hold
    batch x heads x T^2 x T^2 scores, `batch` being the samples of one forward pass (2 with
    classifier-free guidance, times the tiles batched together). At the released tile (T = 320)
    that is about 10^11 scores; MPS allows about 10^9 per buffer."""
    if not limits.attention_materialised:
        return None
    largest = limits.max_tensor_elements(SCORE_BYTES)
    per_pair = batch * heads
    side = int((largest / per_pair) ** 0.25)
    while (side + 1) ** 4 * per_pair <= largest:
        side += 1
    while side > 1 and side**4 * per_pair > largest:
        side -= 1
    return max(8, side // 8 * 8)


# -- VAE tiles --------------------------------------------------------------------------------


def vae_elements_per_pixel(config) -> int:
    """Elements of the VAE's largest activation per image pixel of a pass.

    Encoder: down block i holds block_out_channels[i] at 1/4^i of the pixels. Decoder: up block i
    holds its channels at its resolution, and its upsampler doubles the side before the next block
    narrows the channels. For SD's VAE that is the 256-channel full-resolution tensor out of the
    last upsampler: 256 elements per pixel, twice the encoder's 128."""
    channels = list(config.block_out_channels)
    levels = len(channels)
    largest = max(-(-c // 4**i) for i, c in enumerate(channels))  # encoder
    for i, c in enumerate(reversed(channels)):  # decoder: block i runs at 1/4^(levels-1-i) of the pixels
        at_block = levels - 1 - i
        largest = max(largest, -(-c // 4**at_block))
        if at_block > 0:  # after its upsampler, one level finer
            largest = max(largest, -(-c // 4 ** (at_block - 1)))
    return max(largest, config.out_channels, config.in_channels)
