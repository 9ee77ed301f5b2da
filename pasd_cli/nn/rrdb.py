"""Residual-in-residual dense blocks (ESRGAN), the heavier DRM of the `*_rrdb` checkpoints.

Parameter names follow the released checkpoints (`rdb1.conv1`, ...), which used basicsr's layout;
we implement the block here so basicsr is not a dependency.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_RESIDUAL_SCALE = 0.2
_LEAKY_SLOPE = 0.2


class ResidualDenseBlock(nn.Module):
    def __init__(self, features: int, growth: int):
        super().__init__()
        for k in range(1, 5):
            setattr(self, f"conv{k}", nn.Conv2d(features + (k - 1) * growth, growth, 3, padding=1))
        self.conv5 = nn.Conv2d(features + 4 * growth, features, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            features.append(F.leaky_relu(conv(torch.cat(features, 1)), _LEAKY_SLOPE))
        return self.conv5(torch.cat(features, 1)) * _RESIDUAL_SCALE + x


class RRDB(nn.Module):
    def __init__(self, features: int, growth: int):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(features, growth)
        self.rdb2 = ResidualDenseBlock(features, growth)
        self.rdb3 = ResidualDenseBlock(features, growth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * _RESIDUAL_SCALE + x
