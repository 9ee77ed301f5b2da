"""Pixel-aware cross attention (PACA), the layers PASD adds to the UNet decoder.

Both variants attend from decoder features to a ControlNet residual. The residual a layer sees is
the one paired with the skip connection that layer consumes, so each PACA site is identified by
(up block, layer) and fed that residual through `pixel_context` before the UNet runs.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn


def flatten_pixels(feature: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C): every pixel becomes one key/value token."""
    return feature.flatten(2).transpose(1, 2)


class PixelAttention(Transformer2DModel):
    """Full PASD: a stock SD transformer whose cross attention reads the control residual.

    It runs after the decoder layer's resnet (and text transformer, where there is one); the
    stock up-block forward calls it through a forward hook, so no diffusers code is copied.
    """

    pixel_context: torch.Tensor | None = None

    def apply_after(self, module: nn.Module, args, output):
        if self.pixel_context is None:
            raise RuntimeError("PASD UNet called without ControlNet residuals")
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = self(hidden, encoder_hidden_states=self.pixel_context, return_dict=False)[0]
        return (hidden,) if isinstance(output, tuple) else hidden


class LightPixelAttentionBlock(BasicTransformerBlock):
    """PASD-light: the decoder's text transformer block with one more cross attention.

    `norm2_plus` + `attn2_plus` sit between the text cross attention and the feed-forward, a spot
    the stock forward offers no hook for, hence this forward. It covers the SD 1.5 block
    (layer norm, no positional embedding, no GLIGEN), which `upgrade` checks.
    """

    pixel_context: torch.Tensor | None = None

    @classmethod
    def upgrade(cls, block: BasicTransformerBlock, context_dim: int) -> LightPixelAttentionBlock:
        # The block was built by diffusers inside Transformer2DModel; upgrading it in place keeps
        # every stock argument diffusers chose and all stock parameter names.
        if block.norm_type != "layer_norm" or block.pos_embed is not None:
            raise ValueError(f"light PACA expects an SD 1.5 transformer block, got norm {block.norm_type}")
        attn2 = block.attn2
        dim = attn2.query_dim
        block.__class__ = cls
        block.norm2_plus = nn.LayerNorm(dim, eps=block.norm2.eps, elementwise_affine=True)
        block.attn2_plus = Attention(
            query_dim=dim,
            cross_attention_dim=context_dim,
            heads=attn2.heads,
            dim_head=attn2.inner_dim // attn2.heads,
            bias=False,
            upcast_attention=attn2.upcast_attention,
        )
        return block

    def forward(
        self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None, **_unused
    ):
        if self.pixel_context is None:
            raise RuntimeError("PASD UNet called without ControlNet residuals")
        h = hidden_states
        self_context = encoder_hidden_states if self.only_cross_attention else None
        h = self.attn1(self.norm1(h), encoder_hidden_states=self_context, attention_mask=attention_mask) + h
        h = (
            self.attn2(
                self.norm2(h), encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask
            )
            + h
        )
        h = self.attn2_plus(self.norm2_plus(h), encoder_hidden_states=self.pixel_context) + h
        return self.ff(self.norm3(h)) + h
