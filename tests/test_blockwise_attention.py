"""Blockwise attention (nn/blockwise_attention.py): bfloat16 attention on the CPU as blocks of
queries through matmuls. It computes float32 attention within twice the deviation of torch's own
bfloat16 kernel; it takes only the calls it can compute (CPU, bfloat16, many keys, no mask,
dropout or causal mask); and the pipeline uses it for bfloat16 on the CPU outside --exact only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import LR_INPUT, TINY_BASE, TINY_PASD
from PIL import Image

from pasd_cli.engine import UpscaleSettings
from pasd_cli.engine.pipeline import PASDPipeline
from pasd_cli.nn import blockwise_attention as blockwise
from pasd_cli.nn.blockwise_attention import BlockwiseAttention, blockwise_attention


def _qkv(shape_q, keys, generator, value_dim=None):
    *lead, _, dim = shape_q
    q = torch.randn(shape_q, generator=generator) * 1.5
    k = torch.randn((*lead, keys, dim), generator=generator) * 1.5
    v = torch.randn((*lead, keys, value_dim or dim), generator=generator)
    return q, k, v


@pytest.mark.parametrize(
    "shape_q, keys, value_dim, heads_per_block",
    [
        ((2, 8, 1024, 40), 1024, None, 2),  # SD 1.5's first level, as in a step
        ((1, 5, 300, 64), 777, None, 2),  # odd heads; query rows not a multiple of the block
        ((3, 260, 16), 256, 24, 4),  # 3-D; value wider than query; the fewest keys taken
        ((2, 1, 40, 8), 512, None, 3),  # fewer queries than a block
    ],
)
def test_it_computes_attention_within_twice_torchs_bf16_deviation(shape_q, keys, value_dim, heads_per_block):
    g = torch.Generator().manual_seed(0)
    q, k, v = _qkv(shape_q, keys, g, value_dim)
    exact = F.scaled_dot_product_attention(q, k, v)
    half = [t.bfloat16() for t in (q, k, v)]
    torch_bf16 = F.scaled_dot_product_attention(*half).float()
    ours = blockwise_attention(*half, heads_per_block=heads_per_block)
    assert ours.dtype == torch.bfloat16 and ours.shape == exact.shape
    ours_error = (ours.float() - exact).abs()
    torch_error = (torch_bf16 - exact).abs()
    assert ours_error.mean() <= 2.5 * torch_error.mean()
    assert ours_error.max() <= 3 * torch_error.max()
    # Blocks and heads per block do not change the result: only the scores' rounding differs.
    torch.testing.assert_close(ours, blockwise_attention(*half, heads_per_block=1), rtol=0, atol=0)


def test_a_given_scale_is_used():
    g = torch.Generator().manual_seed(1)
    q, k, v = _qkv((1, 2, 300, 32), 300, g)
    exact = F.scaled_dot_product_attention(q, k, v, scale=0.05)
    ours = blockwise_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), scale=0.05).float()
    default_scale = blockwise_attention(q.bfloat16(), k.bfloat16(), v.bfloat16()).float()
    assert (ours - exact).abs().mean() < 0.2 * (default_scale - exact).abs().mean()


@torch.inference_mode()
def test_the_mode_takes_only_what_it_can_compute():
    g = torch.Generator().manual_seed(2)
    q, k, v = (t.bfloat16() for t in _qkv((1, 4, 300, 32), 300, g))
    short_k, short_v = k[:, :, :77], v[:, :, :77]
    mask = torch.zeros(300, 300, dtype=torch.bfloat16)
    cases = {
        "taken": ((q, k, v), {}),
        "taken, with a scale": ((q, k, v, None, 0.0, False), {"scale": 0.1}),
        "few keys": ((q, short_k, short_v), {}),
        "float32": ((q.float(), k.float(), v.float()), {}),
        "mask": ((q, k, v), {"attn_mask": mask}),
        "causal": ((q, k, v), {"is_causal": True}),
    }
    for name, (args, kwargs) in cases.items():
        expected = F.scaled_dot_product_attention(*args, **kwargs)
        with BlockwiseAttention(heads_per_block=2):
            got = F.scaled_dot_product_attention(*args, **kwargs)
        if name.startswith("taken"):
            scale = kwargs.get("scale")
            torch.testing.assert_close(got, blockwise_attention(q, k, v, scale, 2), rtol=0, atol=0, msg=name)
            assert not torch.equal(got, expected), name  # else this would not tell the two apart
        else:
            torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=name)


@pytest.fixture(scope="module")
def bf16_pipeline():
    """Its own: casting the shared float32 pipeline to bfloat16 and back would round its weights."""
    return PASDPipeline.from_folders(TINY_PASD, TINY_BASE, torch.device("cpu"), torch.bfloat16)


@pytest.mark.parametrize("exact", [False, True])
def test_the_pipeline_uses_it_for_bf16_on_the_cpu_outside_exact_mode(exact, bf16_pipeline, monkeypatch):
    calls = []
    real = blockwise.blockwise_attention

    def counted(query, *args, **kwargs):
        calls.append(tuple(query.shape))
        return real(query, *args, **kwargs)

    monkeypatch.setattr(blockwise, "MIN_KEYS", 16)  # the tiny model's largest attention has 64 keys
    monkeypatch.setattr(blockwise, "blockwise_attention", counted)
    settings = UpscaleSettings(steps=1, scale=2, process_size=64, exact=exact)
    image = Image.open(LR_INPUT).convert("RGB")
    bf16_pipeline.upscale(image, settings)
    assert bool(calls) is not exact
