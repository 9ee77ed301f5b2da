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
