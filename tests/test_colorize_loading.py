"""Loading the colorization model: its scheduler folder beside the checkpoint, read as it is."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import TINY_BASE, TINY_COLOR
from diffusers import UniPCMultistepScheduler

from pasd_cli.engine.colorize_loading import (
    colorize_scheduler_dir,
    load_colorize_components,
    load_colorizer,
    read_scheduler_config,
)
from pasd_cli.errors import ModelError

CPU = torch.device("cpu")
SCHEDULER_DIR = TINY_COLOR.parent / "scheduler"


@pytest.fixture
def model_copy(tmp_path):
    """The colorization model folder, copied so that tests can change its scheduler."""
    folder = tmp_path / "pasd_light_color"
    shutil.copytree(TINY_COLOR.parent, folder)
    return folder


def test_scheduler_folder_is_beside_the_checkpoint_even_with_a_trailing_slash():
    assert colorize_scheduler_dir(TINY_COLOR) == SCHEDULER_DIR
    assert colorize_scheduler_dir(f"{TINY_COLOR}/") == SCHEDULER_DIR
    assert colorize_scheduler_dir(f"{TINY_COLOR}/unet/..") == SCHEDULER_DIR


def test_missing_scheduler_folder_is_a_one_line_model_error(model_copy):
    shutil.rmtree(model_copy / "scheduler")
    with pytest.raises(ModelError) as caught:
        load_colorize_components(model_copy / "checkpoint-180000", TINY_BASE)
    message = str(caught.value)
    assert "scheduler folder not found" in message and str(model_copy / "scheduler") in message
    assert "\n" not in message and caught.value.exit_code == 3


@pytest.mark.parametrize(
    "content,message", [(None, "missing"), ("{not json", "cannot read"), ("[1, 2]", "not hold a scheduler config")]
)
def test_unreadable_scheduler_config(model_copy, content, message):
    config = model_copy / "scheduler" / "scheduler_config.json"
    if content is None:
        config.unlink()
    else:
        config.write_text(content)
    with pytest.raises(ModelError, match=message):
        read_scheduler_config(model_copy / "scheduler")


@pytest.mark.parametrize("name", ["UniPCMultistepScheduler", "DDIMScheduler", "PNDMScheduler", None])
def test_unipc_is_built_whatever_class_the_config_names(model_copy, name):
    """The released code builds UniPC from the folder's config whatever its `_class_name`."""
    config_path = model_copy / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.pop("_class_name", None)
    if name is not None:
        config["_class_name"] = name
    config_path.write_text(json.dumps(config))
    pipeline = load_colorizer(model_copy / "checkpoint-180000", TINY_BASE, CPU, torch.float32)
    scheduler = pipeline.new_scheduler(2)
    assert isinstance(scheduler, UniPCMultistepScheduler)
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.rescale_betas_zero_snr


def test_the_config_is_read_not_assumed(model_copy):
    config_path = model_copy / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.update(prediction_type="epsilon", timestep_spacing="leading", rescale_betas_zero_snr=False)
    config_path.write_text(json.dumps(config))
    pipeline = load_colorizer(f"{model_copy / 'checkpoint-180000'}/", TINY_BASE, CPU, torch.float32)
    scheduler = pipeline.new_scheduler(2)
    assert scheduler.config.prediction_type == "epsilon"
    assert scheduler.timesteps.tolist() == [667, 334]  # UniPC's leading spacing, steps_offset 1
    assert scheduler.alphas_cumprod[-1].item() > 1e-3  # not rescaled to zero terminal SNR


def test_explicit_scheduler_folder(model_copy):
    moved = model_copy.parent / "elsewhere"
    shutil.move(model_copy / "scheduler", moved)
    components = load_colorize_components(model_copy / "checkpoint-180000", TINY_BASE, scheduler_dir=moved)
    assert components.scheduler_config["prediction_type"] == "v_prediction"
