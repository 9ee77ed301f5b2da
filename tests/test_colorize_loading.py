"""Loading the colorization model: its scheduler folder beside the checkpoint, read as it is."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import COLOR_INPUT, TINY_BASE, TINY_COLOR
from PIL import Image

from pasd_cli.engine.colorize import ColorizeSettings
from pasd_cli.engine.colorize_loading import (
    LOOP_SCHEDULERS,
    colorize_scheduler_dir,
    load_colorize_components,
    load_colorizer,
    read_scheduler_config,
    scheduler_class_for,
)
from pasd_cli.engine.pipeline import PASDPipeline
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


@pytest.mark.parametrize(
    "name,expected",
    [
        ("UniPCMultistepScheduler", "UniPCMultistepScheduler"),
        ("DDIMScheduler", "DDIMScheduler"),
        ("PNDMScheduler", "PNDMScheduler"),
        ("EulerDiscreteScheduler", "UniPCMultistepScheduler"),  # scales its input: not for this loop
        ("DDPMScheduler", "UniPCMultistepScheduler"),  # draws noise between steps
        ("NoSuchScheduler", "UniPCMultistepScheduler"),
        (None, "UniPCMultistepScheduler"),
    ],
)
def test_scheduler_class_named_by_the_config(name, expected):
    config = {} if name is None else {"_class_name": name}
    assert scheduler_class_for(config).__name__ == expected


@pytest.mark.parametrize(
    "name,expected",
    [
        ("UniPCMultistepScheduler", "UniPCMultistepScheduler"),
        ("DDIMScheduler", "DDIMScheduler"),
        ("DPMSolverMultistepScheduler", "DPMSolverMultistepScheduler"),
        ("PNDMScheduler", "UniPCMultistepScheduler"),  # has no zero-terminal-SNR rescaling
        ("DEISMultistepScheduler", "UniPCMultistepScheduler"),  # neither
    ],
)
def test_a_class_that_would_ignore_zero_terminal_snr_is_not_built(name, expected):
    config = {**json.loads((SCHEDULER_DIR / "scheduler_config.json").read_text()), "_class_name": name}
    assert config["rescale_betas_zero_snr"] is True
    assert scheduler_class_for(config).__name__ == expected


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


@pytest.fixture(scope="module")
def components():
    return load_colorize_components(TINY_COLOR, TINY_BASE)


@pytest.mark.parametrize("name", LOOP_SCHEDULERS)
def test_each_loop_scheduler_colorizes(components, name):
    """Every class the loader may build runs the shared loop with the v-prediction, trailing
    config (zero terminal SNR where the class has it; DDIM's first sigma is infinite) and gives
    a coloured image; each gives its own result."""
    import diffusers

    components.scheduler_class = getattr(diffusers, name)
    pipeline = PASDPipeline(components, CPU, torch.float32)
    result = pipeline.colorize(Image.open(COLOR_INPUT), ColorizeSettings(steps=3, seed=5, process_size=64))
    rgb = np.asarray(result.image).astype(int)
    assert result.image.size == (56, 40)
    assert (rgb.max(-1) - rgb.min(-1)).max() > 10
    assert result.luma_shift <= 1
    test_each_loop_scheduler_colorizes.results[name] = rgb


test_each_loop_scheduler_colorizes.results = {}


def test_loop_schedulers_differ():
    results = test_each_loop_scheduler_colorizes.results
    if len(results) < len(LOOP_SCHEDULERS):
        pytest.skip("needs the per-scheduler runs")
    first = results["UniPCMultistepScheduler"]
    assert all(not np.array_equal(first, rgb) for name, rgb in results.items() if name != "UniPCMultistepScheduler")


def test_an_infinite_first_sigma_starts_from_pure_noise():
    """DDIM rescaled to zero terminal SNR has alphas_cumprod 0 at t=999, so sigma = inf there;
    the adjustable-noise latents must be the noise, not NaN."""
    from pasd_cli.engine.noise import initial_latents

    generator = torch.Generator().manual_seed(0)
    mean, std, *draws = (torch.randn(1, 4, 3, 5, generator=generator) for _ in range(5))
    sigmas = torch.tensor([float("inf"), 1.5, 0.0])
    latents = initial_latents(mean, std, torch.tensor([999, 499]), sigmas, 900, 0.18215, draws)
    alpha = 1 / (1 + 1.5**2) ** 0.5
    torch.testing.assert_close(latents, alpha * draws[1] + 1.5 * alpha * draws[2])
