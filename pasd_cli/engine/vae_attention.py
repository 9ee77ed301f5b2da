"""The self-attention in the VAE's middle block, at latent resolution, over the whole latent.

It is global: every latent pixel attends to every other, so no tiling of it is exact, and its
cost grows with the square of the latent's area. We run it on the whole latent with
scaled_dot_product_attention in query chunks: the memory-efficient kernels never hold the score
matrix, and where a device falls back to the plain kernel a chunk's scores stay bounded.

`window = R > 0` is an opt-in approximation for very large images on slow devices: each latent
pixel attends only to the pixels within R of it (a square neighbourhood centred on itself).
Unlike attention inside VAE tiles (what the released tiled VAE does), it does not depend on how
the image is cut, so it adds no seams; with R >= the latent's longer side it equals global
attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Score-matrix elements per chunk (1 GiB in float32) for the global case.
MAX_SCORES = 2**28
# Query block side for the windowed case.
WINDOW_BLOCK = 32


class SpatialSelfAttnProcessor:
    """A diffusers attention processor for the VAE's spatial self-attention (4-D input)."""

    def __init__(self, window: int = 0, max_scores: int = MAX_SCORES):
        self.window = window
        self.max_scores = max_scores

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if (
            hidden_states.ndim != 4
            or encoder_hidden_states is not None
            or attention_mask is not None
            or attn.spatial_norm is not None
        ):
            raise ValueError("SpatialSelfAttnProcessor handles plain spatial self-attention only")
        batch, channels, height, width = hidden_states.shape
        residual = hidden_states
        # GroupNorm over (C, H, W) is the same whether the pixels are laid out 2-D or flattened.
        normed = attn.group_norm(hidden_states) if attn.group_norm is not None else hidden_states
        tokens = normed.flatten(2).transpose(1, 2)
        del normed
        heads = attn.heads
        query, key, value = (self._split(proj(tokens), heads) for proj in (attn.to_q, attn.to_k, attn.to_v))
        del tokens
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if self.window and self.window < max(height, width) - 1:
            out = self._windowed(query, key, value, height, width)
        else:
            out = self._global(query, key, value)
        del query, key, value
        out = out.transpose(1, 2).reshape(batch, height * width, -1)
        out = attn.to_out[1](attn.to_out[0](out))
        out = out.transpose(1, 2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    @staticmethod
    def _split(tokens: torch.Tensor, heads: int) -> torch.Tensor:
        batch, length, inner = tokens.shape
        return tokens.view(batch, length, heads, inner // heads).transpose(1, 2)

    def _global(self, query, key, value) -> torch.Tensor:
        length = key.shape[-2]
        chunk = max(1, self.max_scores // (length * query.shape[0] * query.shape[1]))
        if chunk >= query.shape[-2]:
            return F.scaled_dot_product_attention(query, key, value)
        out = torch.empty_like(query)
        for start in range(0, query.shape[-2], chunk):
            out[:, :, start : start + chunk] = F.scaled_dot_product_attention(
                query[:, :, start : start + chunk], key, value
            )
        return out

    def _windowed(self, query, key, value, height: int, width: int) -> torch.Tensor:
        radius, block = self.window, WINDOW_BLOCK
        batch, heads, _, dim = query.shape
        grid = lambda t: t.view(batch, heads, height, width, t.shape[-1])  # noqa: E731
        q2, k2, v2 = grid(query), grid(key), grid(value)
        out = torch.empty_like(q2)
        device = query.device
        for top in range(0, height, block):
            bottom = min(height, top + block)
            k_top, k_bottom = max(0, top - radius), min(height, bottom + radius)
            for left in range(0, width, block):
                right = min(width, left + block)
                k_left, k_right = max(0, left - radius), min(width, right + radius)
                near_rows = (
                    torch.arange(top, bottom, device=device)[:, None]
                    - torch.arange(k_top, k_bottom, device=device)[None, :]
                ).abs() <= radius
                near_cols = (
                    torch.arange(left, right, device=device)[:, None]
                    - torch.arange(k_left, k_right, device=device)[None, :]
                ).abs() <= radius
                mask = (near_rows[:, None, :, None] & near_cols[None, :, None, :]).reshape(
                    (bottom - top) * (right - left), (k_bottom - k_top) * (k_right - k_left)
                )
                q = q2[:, :, top:bottom, left:right].reshape(batch, heads, -1, dim)
                k = k2[:, :, k_top:k_bottom, k_left:k_right].reshape(batch, heads, -1, dim)
                v = v2[:, :, k_top:k_bottom, k_left:k_right].reshape(batch, heads, -1, v2.shape[-1])
                out[:, :, top:bottom, left:right] = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).view(
                    batch, heads, bottom - top, right - left, -1
                )
        return out.view(batch, heads, height * width, -1)


def install(vae, window: int = 0) -> None:
    """Route the attention of both middle blocks of an AutoencoderKL through our processor."""
    for part in (vae.encoder, vae.decoder):
        for attention in getattr(part.mid_block, "attentions", []):
            if attention is not None:
                attention.set_processor(SpatialSelfAttnProcessor(window))


# --- the automatic choice ----------------------------------------------------------------------

# The window the automatic choice uses: 32 latent pixels (256 image pixels) each way.
AUTO_WINDOW = 32


def _resnet_flops(cin: int, cout: int) -> int:
    """Per output pixel: two 3x3 convolutions, and a 1x1 shortcut where the width changes."""
    return 2 * 9 * cin * cout + 2 * 9 * cout * cout + (2 * cin * cout if cin != cout else 0)


def conv_flops_per_latent_pixel(config) -> float:
    """FLOPs of an AutoencoderKL's convolutions (encode plus decode) per latent pixel, from its
    config: what a pass costs besides the middle block's attention (whose q, k, v and output
    projections, linear in the pixels, are counted here)."""
    widths, layers = list(config.block_out_channels), config.layers_per_block
    factor = 2 ** (len(widths) - 1)
    latent, top = config.latent_channels, widths[-1]
    conv = lambda cin, cout: 2 * 9 * cin * cout  # noqa: E731
    at_latent = 2 * 2 * _resnet_flops(top, top)  # both middle blocks' two resnets
    at_latent += conv(top, 2 * latent) + conv(latent, top)  # encoder conv_out, decoder conv_in
    total = float(at_latent + 2 * 4 * 2 * top * top)  # the attention's four projections, both passes
    # Encoder: conv_in at full resolution; block i at 1/2^i, its downsampler's output at 1/2^(i+1).
    total += conv(config.in_channels, widths[0]) * factor**2
    previous = widths[0]
    for index, width in enumerate(widths):
        pixels = (factor / 2**index) ** 2
        total += (_resnet_flops(previous, width) + (layers - 1) * _resnet_flops(width, width)) * pixels
        if index < len(widths) - 1:
            total += conv(width, width) * pixels / 4
        previous = width
    # Decoder: block i (widths reversed) at latent x 2^i, its upsampler's conv at twice that.
    previous = top
    for index, width in enumerate(reversed(widths)):
        pixels = float(4**index)
        total += (_resnet_flops(previous, width) + layers * _resnet_flops(width, width)) * pixels
        if index < len(widths) - 1:
            total += conv(width, width) * pixels * 4
        previous = width
    total += conv(widths[0], config.out_channels) * factor**2
    return total


def global_attention_flops(config, latent_pixels: int) -> float:
    """FLOPs of the middle block's global attention, encode plus decode: scores and their
    weighted sum, 2 x 2 x N^2 x C each pass."""
    return 2 * 4.0 * latent_pixels**2 * config.block_out_channels[-1]


def auto_attention_window(config, latent_height: int, latent_width: int, device_type: str) -> int:
    """The VAE attention window for `vae_attention_window=None`: AUTO_WINDOW on the CPU where
    exact global attention would cost more than all the VAE's convolutions (its cost grows with
    the square of the image area; SD 1.5's VAE from about 3.7K px on a side, the tiny test
    model's from about 1K), else 0 (exact): always on GPUs, whose fused attention kernels make
    it cheap, and wherever the window would see the whole latent anyway."""
    pixels = latent_height * latent_width
    if device_type != "cpu" or max(latent_height, latent_width) <= AUTO_WINDOW + 1:
        return 0
    dominates = global_attention_flops(config, pixels) > conv_flops_per_latent_pixel(config) * pixels
    return AUTO_WINDOW if dominates else 0
