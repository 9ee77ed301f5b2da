"""GroupNorm with statistics gathered piecewise: over the tiles or row strips of a tensor that is
never normalised whole. Pieces merge in float64 (Chan et al.), so the statistics are those of
the whole tensor up to rounding, and the result that of nn.GroupNorm up to float rounding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Rows of a piece whose statistics are taken at once: a chunk that is not dense in memory is copied
# (channel_moments), and shorter float32 sums round less.
CHUNK_BYTES = 8 << 20
# Where a channel's mean passes this many of its standard deviations, the fast statistics' float32
# sums would move it by more than about 2e-4 standard deviations (measured: 7e-3 at 2000).
MAX_MEAN_PER_STD = 64


@dataclass
class GroupStats:
    """Per (batch, group) count, mean and sum of squared deviations, float64 on the CPU."""

    count: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None

    def add(self, count: int, mean: torch.Tensor, var: torch.Tensor) -> None:
        # To the CPU first: MPS has no float64.
        mean, m2 = mean.cpu().double(), var.cpu().double() * count
        if self.count is None:
            self.count, self.mean, self.m2 = torch.full_like(mean, count), mean, m2
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * count / total)
        self.count = total

    def add_values(self, piece: torch.Tensor, groups: int) -> None:
        """A piece (N, C, H, ...) of the tensor, in any dtype, in any layout, taken CHUNK_BYTES of
        rows at a time. Per channel first: a slice of rows cannot be viewed as groups, and
        reshaping it would copy it."""
        batch, channels = piece.shape[:2]
        row_bytes = piece[:, :, :1].numel() * piece.element_size()
        for chunk in piece.split(max(1, CHUNK_BYTES // row_bytes), dim=2):
            mean, var = channel_moments(chunk)
            # Channels of a group hold equally many values: the group's mean is their means'
            # mean, its variance their variances' mean plus their means' variance.
            mean = mean.cpu().double().reshape(batch, groups, -1)
            var = var.cpu().double().reshape(batch, groups, -1)
            group_var = var.mean(-1) + mean.var(-1, unbiased=False)
            self.add(chunk[0, 0].numel() * (channels // groups), mean.mean(-1), group_var)

    @property
    def var(self) -> torch.Tensor:
        return self.m2 / self.count

    def scale_shift(self, norm: nn.GroupNorm, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """`norm` as a per-channel affine map, float32 (N, C, 1, 1): normalised = x * scale + shift,
        the form nn.GroupNorm's kernels compute."""
        rstd = torch.rsqrt(self.var + norm.eps)
        per_channel = norm.num_channels // norm.num_groups
        scale = rstd.repeat_interleave(per_channel, dim=1)
        shift = -self.mean.repeat_interleave(per_channel, dim=1) * scale
        if norm.affine:
            weight, bias = norm.weight.detach().cpu().double(), norm.bias.detach().cpu().double()
            scale, shift = scale * weight, shift * weight + bias
        scale_f, shift_f = (t.float().to(device)[:, :, None, None] for t in (scale, shift))
        return scale_f, shift_f


def channel_moments(piece: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (image, channel) mean and biased variance of `piece` (N, C, ...), float32.

    On the CPU, batch norm's statistics kernel: 25x torch.var_mean's speed on channels-last
    pieces, where var_mean's Welford steps took a sixth of a VAE decode. It sums each channel in
    float32 in one sequence, so its mean is off by about 4e-6 x |mean| / std standard deviations
    (Welford's: 3e-8 x); a piece with a channel whose mean passes MAX_MEAN_PER_STD standard
    deviations, where that would show beside float32's own rounding, gets var_mean's instead.
    Elsewhere var_mean, which the GPUs' kernels run fast. The kernel is fast on dense memory
    only (28 against 2 ms on a strip of a wider tensor's channels): others are copied first."""
    count = piece[0, 0].numel()
    if piece.device.type == "cpu" and piece.dtype in (torch.float32, torch.bfloat16) and count > 1:
        if not piece.is_contiguous(memory_format=torch.channels_last) and not piece.is_contiguous():
            piece = piece.contiguous(memory_format=torch.channels_last)
        means, variances = [], []
        for image in piece.split(1):
            mean, var = torch.ones(2, piece.shape[1]).unbind()  # the kernel updates these in place
            torch.batch_norm_update_stats(image, mean, var, 1.0)  # momentum 1: this piece's own
            means.append(mean)
            variances.append(var * ((count - 1) / count))  # it keeps the unbiased variance
        mean, var = torch.stack(means), torch.stack(variances)
        if not (mean.abs() > MAX_MEAN_PER_STD * var.sqrt()).any():
            return mean, var
    values = piece if piece.dtype == torch.float32 else piece.float()
    var, mean = torch.var_mean(values, dim=tuple(range(2, piece.dim())), unbiased=False)
    return mean, var


def normalise(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x * scale + shift in float32, back in x's dtype (a new tensor). One bfloat16 image on the
    CPU goes through batch norm's inference kernel (mean 0, variance 1, no eps: the same affine
    map), which takes float32 parameters beside bfloat16 values, 35x faster than widening x for
    addcmul and narrowing the result: bit for bit the same on dense memory; on a slot of a wider
    tensor's channels about 1 value in 100,000 rounds to the neighbouring bfloat16."""
    scale, shift = scale.to(x.device), shift.to(x.device)
    if x.dtype == torch.float32:
        return torch.addcmul(shift, x, scale)
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.shape[0] == scale.shape[0] == 1:
        zeros, ones = torch.zeros(x.shape[1]), torch.ones(x.shape[1])
        return F.batch_norm(x, zeros, ones, scale.flatten(), shift.flatten(), training=False, eps=0.0)
    return torch.addcmul(shift, x.float(), scale).to(x.dtype)
