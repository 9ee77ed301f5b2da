"""The colour fixes in strips (bounded memory) give the whole-image results."""

from __future__ import annotations

import torch

from pasd_cli.engine import color


def _images(height=300, width=170):
    g = torch.Generator().manual_seed(0)
    sr = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g)
    reference = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g)
    return sr, reference


def test_wavelet_strips_are_bit_identical():
    sr, reference = _images()
    whole = color.wavelet_color_fix(sr, reference, rows=10**6)
    for rows in (31, 64, 256):
        assert torch.equal(color.wavelet_color_fix(sr, reference, rows=rows), whole)


def test_wavelet_strip_needs_its_halo(monkeypatch):
    """With less context than the blurs reach, strips differ: the halo is what makes them exact."""
    sr, reference = _images()
    whole = color.wavelet_color_fix(sr, reference, rows=10**6)
    monkeypatch.setattr(color, "WAVELET_HALO", 16)
    assert not torch.equal(color.wavelet_color_fix(sr, reference, rows=64), whole)


def test_adain_matches_the_float_statistics():
    sr, reference = _images()

    def released(sr, reference):  # whole-image float statistics, unbiased variance, as released
        def mean_std(x):
            flat = x.flatten(2)
            return flat.mean(2)[..., None, None], (flat.var(2) + 1e-5).sqrt()[..., None, None]

        content, style = sr.float()[None] / 255, reference.float()[None] / 255
        (cm, cs), (sm, ss) = mean_std(content), mean_std(style)
        return ((content - cm) / cs * ss + sm).clamp(0, 1).squeeze(0).mul(255).to(torch.uint8)

    diff = (color.adain_color_fix(sr, reference, rows=64).int() - released(sr, reference).int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 1e-3
