"""The engine through the real `pasd` command: parity, and refusals with clear exit codes."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import LR_INPUT, REFERENCE_ARGS, TINY_BASE, TINY_PASD, pasd_here, tiny_model_args
from PIL import Image
from safetensors.torch import load_file, save_file

from pasd_cli.engine.loading import load_components
from pasd_cli.engine.pipeline import image_to_tensor
from pasd_cli.errors import ModelError


def test_cli_reproduces_reference_final_image(tmp_path, reference):
    proc = pasd_here("upscale", LR_INPUT, "-o", tmp_path, *tiny_model_args(), *REFERENCE_ARGS)
    assert proc.returncode == 0, proc.stderr
    written = tmp_path / "lr_input.png"
    assert proc.stdout.strip() == str(written)
    ours = image_to_tensor(Image.open(written))
    diff = (ours.int() - reference["pipeline"]["final_uint8"].int()).abs()
    assert diff.max() <= 2 and diff.float().mean() < 0.05


def _broken_checkpoint(tmp_path, part: str, edit) -> str:
    folder = tmp_path / "ckpt"
    shutil.copytree(TINY_PASD, folder)
    path = folder / part / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path)
    return str(folder)


BREAKAGES = {
    "paca key removed": (
        "unet",
        lambda s: s.pop("up_blocks.2.pixel_attentions.1.proj_in.weight"),
        "up_blocks.2.pixel_attentions.1.proj_in.weight",
    ),
    "shape changed": (
        "controlnet",
        lambda s: s.__setitem__("controlnet_mid_block.bias", torch.zeros(7)),
        "controlnet_mid_block.bias",
    ),
    "stray key": (
        "unet",
        lambda s: s.__setitem__("up_blocks.0.stray.weight", torch.zeros(1)),
        "up_blocks.0.stray.weight",
    ),
    "to_rgbs head missing": (
        "controlnet",
        lambda s: s.pop("controlnet_cond_embedding.to_rgbs.1.bias"),
        "controlnet_cond_embedding.to_rgbs.1.bias",
    ),
}


@pytest.mark.parametrize("case", sorted(BREAKAGES))
def test_wrong_key_set_is_a_model_error_naming_the_key(tmp_path, case):
    part, edit, key = BREAKAGES[case]
    with pytest.raises(ModelError, match=re.escape(key)):
        load_components(Path(_broken_checkpoint(tmp_path, part, edit)), TINY_BASE)


def test_wrong_key_set_is_refused_with_exit_3(tmp_path):
    """Through the command (one case: the others are the same error, checked in-process above)."""
    part, edit, key = BREAKAGES["paca key removed"]
    checkpoint = _broken_checkpoint(tmp_path, part, edit)
    proc = pasd_here(
        "upscale",
        LR_INPUT,
        "-o",
        tmp_path / "out",
        *tiny_model_args(pasd=checkpoint),
        "--steps",
        "1",
        "--device",
        "cpu",
        "--caption",
        "none",
    )
    assert proc.returncode == 3, proc.stderr
    assert key in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_stock_unet_is_not_a_pasd_checkpoint(tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(TINY_PASD, folder)
    shutil.rmtree(folder / "unet")
    shutil.copytree(TINY_BASE / "unet", folder / "unet")
    with pytest.raises(ModelError, match="no PACA layers"):
        load_components(folder, TINY_BASE)


def _one_line_error(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_unreadable_image_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("this is not a png")
    proc = pasd_here("upscale", bad, "-o", tmp_path / "out", *tiny_model_args(), "--steps", "1")
    assert proc.returncode == 1
    assert "bad.png" in _one_line_error(proc)
    assert not list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True


@pytest.mark.parametrize("which", ["input", "--pasd", "--base"])
def test_missing_folder_is_one_line_error(tmp_path, which):
    missing = str(tmp_path / "does-not-exist")
    args = {
        "input": [missing, "-o", tmp_path / "out", *tiny_model_args()],
        "--pasd": [LR_INPUT, "-o", tmp_path / "out", *tiny_model_args(pasd=missing)],
        "--base": [LR_INPUT, "-o", tmp_path / "out", *tiny_model_args(base=missing)],
    }[which]
    proc = pasd_here("upscale", *args)
    assert proc.returncode != 0
    assert "does-not-exist" in _one_line_error(proc)
