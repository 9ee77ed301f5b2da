"""Pickled bases and LoRAs (.ckpt, .pt, .bin): refused unless trusted, and even then read with
restricted unpickling, so a malicious file never runs code."""

from __future__ import annotations

import pickle

import pytest
import torch
from tiny_bases import fresh_components, perturbed, stock_state, write_checkpoint

from pasd_cli.cli.app import hint_for
from pasd_cli.engine.bases import apply_base
from pasd_cli.engine.lora import apply_lora
from pasd_cli.engine.weights import read_state_dict
from pasd_cli.errors import ModelError


class _CreatesFile:
    """Unpickling this calls open(marker, "w"): the file appearing proves code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _malicious(path, marker, zipped: bool):
    payload = {"state_dict": {"model.diffusion_model.conv_in.weight": _CreatesFile(marker)}}
    if zipped:
        torch.save(payload, path)  # the torch zip format civitai .ckpt files use
    else:
        path.write_bytes(pickle.dumps(payload))
    return path


@pytest.mark.parametrize("zipped", [True, False], ids=["torch-zip", "plain-pickle"])
def test_payload_is_live(tmp_path, zipped):
    """The test can fail: an unrestricted load of the same kind of file does run the payload."""
    marker = tmp_path / "ran"
    path = _malicious(tmp_path / "evil.ckpt", marker, zipped)
    torch.load(path, weights_only=False) if zipped else pickle.loads(path.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("zipped", [True, False], ids=["torch-zip", "plain-pickle"])
@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_malicious_pickle_never_runs(tmp_path, zipped, suffix):
    marker = tmp_path / "ran"
    path = _malicious(tmp_path / f"evil{suffix}", marker, zipped)
    components = fresh_components() if suffix == ".ckpt" else None
    with pytest.raises(ModelError, match="pickle") as refused:
        apply_base(components, path) if components else read_state_dict(path)
    assert refused.value.exit_code == 3 and "--trust-pickle" in hint_for(refused.value)  # as the command line says it
    assert not marker.exists()
    with pytest.raises(ModelError, match="restricted unpickling") as failed:
        apply_base(components, path, trust_pickle=True) if components else read_state_dict(path, trust_pickle=True)
    assert failed.value.exit_code == 3
    assert not marker.exists()


def test_untrusted_pickle_is_refused_before_it_is_opened(tmp_path):
    path = tmp_path / "missing.ckpt"  # does not exist: the refusal must not depend on reading it
    with pytest.raises(ModelError, match="refused"):
        read_state_dict(path)


def test_trusted_plain_ckpt_loads_like_the_safetensors(tmp_path):
    from safetensors.torch import load_file

    components = fresh_components()
    other_unet = perturbed(stock_state(components), seed=30)
    safetensors = write_checkpoint(tmp_path / "style.safetensors", components, unet_state=other_unet)
    ckpt = tmp_path / "style.ckpt"
    torch.save({"state_dict": load_file(safetensors), "global_step": 1000}, ckpt)
    apply_base(components, ckpt, trust_pickle=True)
    state = components.unet.state_dict()
    assert all(torch.equal(state[k], v) for k, v in other_unet.items())


def test_pickled_lora_is_refused_unless_trusted(tmp_path):
    components = fresh_components()
    module = "down_blocks.0.attentions.0.proj_in"
    weight = components.unet.get_submodule(module).weight
    path = tmp_path / "style.pt"
    torch.save(
        {
            f"lora_unet_{module.replace('.', '_')}.lora_down.weight": torch.ones(2, weight.shape[1], 1, 1),
            f"lora_unet_{module.replace('.', '_')}.lora_up.weight": torch.ones(weight.shape[0], 2, 1, 1),
        },
        path,
    )
    with pytest.raises(ModelError, match="pickle"):
        apply_lora(components, path)
    before = weight.clone()
    apply_lora(components, path, trust_pickle=True)
    assert torch.allclose(components.unet.get_submodule(module).weight, before + 2.0, atol=1e-6)
