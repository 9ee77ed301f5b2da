"""The PASD ControlNet: diffusers' ControlNetModel whose hint encoder is the Degradation Removal
Module (DRM)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import ControlNetModel
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding
from torch import nn

from .rrdb import RRDB


@dataclass(frozen=True)
class EmbeddedHint:
    """A hint already passed through the DRM.

    The DRM depends on the hint image only, not on the timestep or the prompt, so the engine embeds
    each hint once per run and hands this to every ControlNet call instead of the image.
    """

    embedding: torch.Tensor


class DegradationRemovalModule(ControlNetConditioningEmbedding):
    """The stock hint encoder plus PASD's optional RRDB stage and its auxiliary toRGB heads.

    The toRGB heads only served training (an L1 loss at 1/2, 1/4, 1/8 scale); they are kept so
    released checkpoints load strictly, and never computed here.
    """

    def __init__(
        self,
        conditioning_embedding_channels: int,
        conditioning_channels: int = 3,
        block_out_channels: tuple[int, ...] = (16, 32, 96, 256),
        rrdb_blocks: int = 0,
    ):
        super().__init__(conditioning_embedding_channels, conditioning_channels, block_out_channels)
        first = block_out_channels[0]
        if rrdb_blocks:
            # Released name, spelling included.
            self.preprocesser = nn.Sequential(*(RRDB(first, first) for _ in range(rrdb_blocks)))
        self.to_rgbs = nn.ModuleList(
            nn.Conv2d(channels, 3, kernel_size=3, padding=1) for channels in block_out_channels[1:]
        )

    def forward(self, conditioning):
        if isinstance(conditioning, EmbeddedHint):
            return conditioning.embedding
        embedding = F.silu(self.conv_in(conditioning))
        if hasattr(self, "preprocesser"):
            embedding = self.preprocesser(embedding)
        for block in self.blocks:
            embedding = F.silu(block(embedding))
        return self.conv_out(embedding)


class PASDControlNet(ControlNetModel):
    """Call `use_degradation_removal(rrdb_blocks)` once after construction, before loading."""

    def use_degradation_removal(self, rrdb_blocks: int = 0) -> None:
        cfg = self.config
        self.rrdb_blocks = rrdb_blocks
        self.controlnet_cond_embedding = DegradationRemovalModule(
            conditioning_embedding_channels=cfg.block_out_channels[0],
            conditioning_channels=cfg.conditioning_channels,
            block_out_channels=tuple(cfg.conditioning_embedding_out_channels),
            rrdb_blocks=rrdb_blocks,
        )

    def embed_hint(self, hint: torch.Tensor) -> EmbeddedHint:
        """Run the DRM once; `hint` is the upsampled LR image in [0, 1], (B, 3, H, W)."""
        if self.config.controlnet_conditioning_channel_order == "bgr":
            hint = torch.flip(hint, dims=[1])
        return EmbeddedHint(self.controlnet_cond_embedding(hint))
