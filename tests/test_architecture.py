"""Architecture at full SD 1.5 size, built on the meta device: exact parameter and key counts
(spec section 2), and variant detection from state-dict keys."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FIXTURES, TINY_LIGHT, TINY_PASD

from pasd_cli.errors import ModelError
from pasd_cli.nn.loading import (
    build_pasd_controlnet,
    build_pasd_unet,
    detect_rrdb_blocks,
    detect_unet_variant,
    read_keys,
    weights_path,
)

SD15 = FIXTURES / "sd15"


def _count(model) -> tuple[int, int]:
    return sum(p.numel() for p in model.parameters()), len(model.state_dict())


@pytest.mark.parametrize("variant,params,keys", [("full", 1_107_755_524, 998), ("light", 888_218_884, 767)])
def test_sd15_unet_size(variant, params, keys):
    config = json.loads((SD15 / "unet_config.json").read_text())
    with torch.device("meta"):
        unet = build_pasd_unet(config, variant)
    assert _count(unet) == (params, keys)


@pytest.mark.parametrize("rrdb,params,keys", [(0, 361_289_497, 346), (2, 361_497_337, 406)])
def test_sd15_controlnet_size(rrdb, params, keys):
    config = json.loads((SD15 / "controlnet_config.json").read_text())
    with torch.device("meta"):
        controlnet = build_pasd_controlnet(config, rrdb)
    assert _count(controlnet) == (params, keys)


def test_rrdb_controlnet_runs_and_keeps_shape():
    config = json.loads((TINY_PASD / "controlnet" / "config.json").read_text())
    controlnet = build_pasd_controlnet(config, rrdb_blocks=2).eval()
    keys = controlnet.state_dict().keys()
    assert detect_rrdb_blocks(keys) == 2
    assert any(k.startswith("controlnet_cond_embedding.preprocesser.1.rdb3.conv5.") for k in keys)
    hint = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        embedding = controlnet.embed_hint(hint).embedding
    assert embedding.shape == (1, config["block_out_channels"][0], 8, 8)


def test_variant_detection_from_released_files():
    assert detect_unet_variant(read_keys(weights_path(TINY_PASD / "unet"))) == "full"
    assert detect_unet_variant(read_keys(weights_path(TINY_LIGHT / "unet"))) == "light"
    assert detect_rrdb_blocks(read_keys(weights_path(TINY_PASD / "controlnet"))) == 0
    with pytest.raises(ModelError, match="no PACA"):
        detect_unet_variant(["conv_in.weight"])
    with pytest.raises(ModelError, match="both"):
        detect_unet_variant(
            ["up_blocks.0.pixel_attentions.0.norm.weight", "up_blocks.1.attentions.0.proj_in_plus.weight"]
        )
