"""The PASD UNet: diffusers' UNet2DConditionModel with PACA layers added to its decoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from .paca import LightPixelAttentionBlock, PixelAttention, flatten_pixels

FULL = "full"
LIGHT = "light"
UNET_VARIANTS = (FULL, LIGHT)


@dataclass(frozen=True)
class _Site:
    """One decoder layer with PACA and the index of the control residual it attends to."""

    block: int
    layer: int
    residual: int


class PASDUNet(UNet2DConditionModel):
    """Call `add_pixel_attention(variant)` once after construction, before loading weights."""

    paca_variant: str | None = None

    def add_pixel_attention(self, variant: str) -> None:
        if variant not in UNET_VARIANTS:
            raise ValueError(f"unknown PASD UNet variant {variant!r}")
        if self.paca_variant is not None:
            raise RuntimeError("PACA layers are already installed")
        self.paca_variant = variant
        self._paca_sites = self._decoder_sites()
        if variant == FULL:
            self._add_full()
        else:
            self._add_light()

    def _decoder_sites(self) -> list[_Site]:
        # The decoder pops skips last-in-first-out; residual i pairs with skip i.
        sites, remaining = [], sum(len(b.resnets) for b in self.up_blocks)
        for i, block in enumerate(self.up_blocks):
            for j in range(len(block.resnets)):
                remaining -= 1
                sites.append(_Site(i, j, remaining))
        return sites

    def _skip_channels(self, site: _Site) -> int:
        resnet = self.up_blocks[site.block].resnets[site.layer]
        return resnet.conv1.in_channels - self._layer_input_channels(site)

    def _layer_input_channels(self, site: _Site) -> int:
        if site.layer > 0:
            return self.up_blocks[site.block].resnets[site.layer - 1].out_channels
        if site.block > 0:
            return self.up_blocks[site.block - 1].resnets[-1].out_channels
        return self.config.block_out_channels[-1]

    def _heads(self, block: int) -> int:
        heads = self.config.num_attention_heads or self.config.attention_head_dim
        if isinstance(heads, int):
            return heads
        return list(reversed(heads))[block]

    def _add_full(self) -> None:
        cfg = self.config
        for i, block in enumerate(self.up_blocks):
            heads = self._heads(i)
            layers = []
            for site in (s for s in self._paca_sites if s.block == i):
                out = block.resnets[site.layer].out_channels
                layers.append(
                    PixelAttention(
                        num_attention_heads=heads,
                        attention_head_dim=out // heads,
                        in_channels=out,
                        num_layers=1,
                        cross_attention_dim=self._skip_channels(site),
                        norm_num_groups=cfg.norm_num_groups,
                        use_linear_projection=cfg.use_linear_projection,
                        upcast_attention=cfg.upcast_attention,
                    )
                )
            block.pixel_attentions = nn.ModuleList(layers)
            anchors = getattr(block, "attentions", None) or block.resnets
            for anchor, paca in zip(anchors, layers):
                anchor.register_forward_hook(paca.apply_after)

    def _add_light(self) -> None:
        for site in self._paca_sites:
            block = self.up_blocks[site.block]
            if not hasattr(block, "attentions"):
                continue
            transformer = block.attentions[site.layer]
            skip = self._skip_channels(site)
            transformer.proj_in_plus = (
                nn.Linear(skip, skip) if transformer.use_linear_projection else nn.Conv2d(skip, skip, kernel_size=1)
            )
            for tblock in transformer.transformer_blocks:
                LightPixelAttentionBlock.upgrade(tblock, context_dim=skip)

    def _pixel_contexts(self, residuals) -> list[tuple[nn.Module, torch.Tensor]]:
        """Pairs (module that reads it, context tensor) for every PACA site."""
        pairs = []
        for site in self._paca_sites:
            block = self.up_blocks[site.block]
            residual = residuals[site.residual]
            if self.paca_variant == FULL:
                pairs.append((block.pixel_attentions[site.layer], flatten_pixels(residual)))
            elif hasattr(block, "attentions"):
                transformer = block.attentions[site.layer]
                if transformer.use_linear_projection:
                    context = transformer.proj_in_plus(flatten_pixels(residual))
                else:
                    context = flatten_pixels(transformer.proj_in_plus(residual))
                pairs.extend((tblock, context) for tblock in transformer.transformer_blocks)
        return pairs

    def forward(
        self,
        sample,
        timestep,
        encoder_hidden_states,
        *args,
        down_block_additional_residuals=None,
        mid_block_additional_residual=None,
        **kwargs,
    ):
        if self.paca_variant is None:
            raise RuntimeError("PASDUNet has no PACA layers; call add_pixel_attention first")
        if down_block_additional_residuals is None or mid_block_additional_residual is None:
            raise ValueError("the PASD UNet needs the ControlNet residuals (down and mid)")
        pairs = self._pixel_contexts(down_block_additional_residuals)
        for module, context in pairs:
            module.pixel_context = context
        try:
            return super().forward(
                sample,
                timestep,
                encoder_hidden_states,
                *args,
                down_block_additional_residuals=down_block_additional_residuals,
                mid_block_additional_residual=mid_block_additional_residual,
                **kwargs,
            )
        finally:
            for module, _ in pairs:
                module.pixel_context = None
