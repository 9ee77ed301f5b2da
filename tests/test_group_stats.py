"""Piecewise GroupNorm statistics (engine/group_stats.py): per-channel moments from batch norm's
statistics kernel on the CPU, against float64; the fallback where a channel's mean dwarfs its
spread; whole-tensor GroupNorm from strips."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pasd_cli.engine.group_stats import MAX_MEAN_PER_STD, GroupStats, channel_moments, normalise


def _piece(dtype, channels_last: bool, mean: float = 0.5, std: float = 2.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 64, 96, 80, generator=generator) * std + mean).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x[:, :, 8:72]  # a strip of rows: not contiguous in NCHW


def _reference(piece: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    var, mean = torch.var_mean(piece.double(), dim=(2, 3), unbiased=False)
    return mean, var


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channel_moments_match_float64(dtype, channels_last):
    piece = _piece(dtype, channels_last)
    mean, var = channel_moments(piece)
    assert mean.shape == var.shape == (2, 64) and mean.dtype == var.dtype == torch.float32
    ref_mean, ref_var = _reference(piece)
    std = ref_var.sqrt()
    assert ((mean.double() - ref_mean).abs() / std).max() < 1e-5
    assert ((var.double() - ref_var).abs() / ref_var).max() < 1e-4


def test_a_mean_far_beyond_the_spread_gets_welfords_moments():
    """At 2000 standard deviations the fast kernel's float32 sums moved the mean by 7e-3 of one;
    the fallback keeps it within float32's own rounding of the values."""
    piece = _piece(torch.float32, True, mean=1000.0, std=0.5)
    assert 1000.0 / 0.5 > MAX_MEAN_PER_STD
    mean, _ = channel_moments(piece)
    ref_mean, ref_var = _reference(piece)
    assert ((mean.double() - ref_mean).abs() / ref_var.sqrt()).max() < 2e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_norm_from_strips_is_group_norm(dtype):
    generator = torch.Generator().manual_seed(1)
    x = (torch.randn(1, 64, 96, 80, generator=generator) * 3 + 1).contiguous(memory_format=torch.channels_last)
    norm = nn.GroupNorm(16, 64, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(generator=generator)
        norm.bias.normal_(generator=generator)
    stats = GroupStats()
    x = x.to(dtype)
    for top in range(0, 96, 40):
        stats.add_values(x[:, :, top : top + 40], norm.num_groups)
    scale, shift = stats.scale_shift(norm, x.device)
    with torch.no_grad():
        expected = norm.double()(x.double())
    got = normalise(x, scale, shift).double()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bfloat16: the result's own rounding
    assert (got - expected).abs().max() < tolerance * expected.abs().max()


@pytest.mark.parametrize("channels_last", [True, False])
def test_bf16_normalise_is_the_float32_affine_map_rounded_once(channels_last):
    generator = torch.Generator().manual_seed(2)
    x = (torch.randn(1, 64, 48, 80, generator=generator) * 4).to(torch.bfloat16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for piece in (x, x[:, :, 4:20], x[:, 8:40]):  # dense, rows, a slot of the channels
        scale, shift = (torch.randn(1, piece.shape[1], 1, 1, generator=generator) for _ in range(2))
        got = normalise(piece, scale, shift)
        expected = torch.addcmul(shift, piece.float(), scale).to(torch.bfloat16)
        assert got.dtype == torch.bfloat16
        if piece.is_contiguous() or piece.is_contiguous(memory_format=torch.channels_last):
            assert torch.equal(got, expected)
        ulp = expected.float().abs() * 2**-7  # one bfloat16 unit or less
        assert ((got.float() - expected.float()).abs() <= ulp).all()
