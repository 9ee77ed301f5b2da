"""How many latent tiles one denoiser pass takes when the tile batch is automatic.

Batching tiles leaves the FLOPs as they are; it pays where one tile leaves the device's cores
idle. A CUDA GPU runs a 64-latent tile (the CFG pair: batch 2) far below its throughput, so
there the tiles of a step go through in as few passes as memory allows. A CPU's matrix kernels
already run one tile at full speed (the products are thousands of rows long), so a batch only
multiplies the activations' memory; MPS must fit each attention score matrix in one buffer
(engine.limits), which a batch multiplies too. Both take one tile per pass.
"""

from __future__ import annotations

# Values a denoiser pass holds at its peak, per latent pixel of one sample, at SD-1.5 size
# (UNet and ControlNet with PACA, the ControlNet's residuals kept for the UNet, attention by
# SDPA): measured on the CPU in float32 at 64 latents, about 0.33 GB above the weights for the
# CFG pair, i.e. 10,000 values a pixel; half as much again for the kernels' workspaces.
ACTIVATION_VALUES_PER_PIXEL = 15_000
# Past a few tiles a pass is as efficient as it gets; more would only hold more memory.
MAX_AUTO_TILE_BATCH = 8


def pass_bytes(tile_pixels: int, samples: int, itemsize: int) -> int:
    """The activations' peak of one denoiser pass over `samples` tiles of `tile_pixels` latents."""
    return ACTIVATION_VALUES_PER_PIXEL * tile_pixels * samples * itemsize


def auto_tile_batch(
    device_type: str, tiles: int, tile_pixels: int, copies: int, itemsize: int, budget: int | None
) -> int:
    """Tiles per pass for a step of `tiles` tiles of `tile_pixels` latents, each run as `copies`
    samples (2 with CFG), on a device with `budget` bytes free for activations (None: unknown).
    CUDA: as many as the budget holds, at most MAX_AUTO_TILE_BATCH and the step's tiles, the
    step's tiles spread evenly over the passes; elsewhere, and without a budget, one."""
    if device_type != "cuda" or budget is None or tiles <= 1:
        return 1
    fits = budget // max(1, pass_bytes(tile_pixels, copies, itemsize))
    most = max(1, min(fits, MAX_AUTO_TILE_BATCH, tiles))
    passes = -(-tiles // most)
    return -(-tiles // passes)
