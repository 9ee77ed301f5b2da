"""The whole Real-ISR pipeline against the released implementation's run (reference C).

Free-running stages use the reference README's tolerances; stages fed the stored inputs
(teacher forcing) localise a mismatch and use tighter ones.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from conftest import LR_INPUT
from PIL import Image

from pasd_cli.engine import ADDED_PROMPT, NEGATIVE_PROMPT, UpscaleSettings
from pasd_cli.engine.color import wavelet_color_fix
from pasd_cli.engine.noise import initial_latents, released_step_index, standard_normal_draws
from pasd_cli.engine.pipeline import decoded_to_uint8, image_to_tensor
from pasd_cli.engine.prompts import build_prompt
from pasd_cli.engine.resize import make_hint

# Exact mode: the released computation (the pipeline is float32, the tiny model's dtype).
SETTINGS = UpscaleSettings(
    exact=True,
    steps=2,
    guidance=9.0,
    conditioning_scale=1.0,
    scale=2,
    process_size=112,
    added_noise_level=900,
    prompt="a tiny test image",
    seed=1234,
)


def assert_pipeline_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """README: pipeline eps/latents within 1e-3 * max|ref|."""
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-3 * theirs.abs().max().item())


def assert_images_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """README: uint8 images max abs diff <= 2, mean < 0.05."""
    assert ours.shape == theirs.shape and ours.dtype == torch.uint8
    diff = (ours.int() - theirs.int()).abs()
    assert diff.max() <= 2 and diff.float().mean() < 0.05, (diff.max(), diff.float().mean())


@pytest.fixture(scope="module")
def free_run(tiny_pipeline):
    seen = defaultdict(list)
    result = tiny_pipeline.upscale(Image.open(LR_INPUT), SETTINGS, trace=lambda name, value: seen[name].append(value))
    return result, seen


def test_defaults_are_the_released_prompts(reference):
    assert SETTINGS.added_prompt == ADDED_PROMPT == reference["pipeline"]["args"]["added_prompt"]
    assert SETTINGS.negative_prompt == NEGATIVE_PROMPT == reference["pipeline"]["negative_prompt"]


def test_prompt_string(reference, free_run):
    assert build_prompt("a tiny test image", ADDED_PROMPT, separator="") == reference["pipeline"]["prompt"]
    assert free_run[1]["prompt"] == [reference["pipeline"]["prompt"]]


def test_input_and_hint_image(reference, free_run):
    ref = reference["pipeline"]
    lr = Image.open(LR_INPUT).convert("RGB")
    assert torch.equal(image_to_tensor(lr), reference["lr_image_uint8"])
    assert torch.equal(image_to_tensor(make_hint(lr, 2, 112)), ref["upscaled_input_uint8"])
    assert torch.equal(free_run[1]["upscaled_input_uint8"][0], ref["upscaled_input_uint8"])


def test_prompt_embeddings(reference, free_run):
    torch.testing.assert_close(
        free_run[1]["prompt_embeds"][0], reference["pipeline"]["prompt_embeds"], rtol=1e-4, atol=1e-4
    )


def test_schedule(reference, free_run, tiny_pipeline):
    ref = reference["pipeline"]
    scheduler = tiny_pipeline.new_scheduler(2)
    assert torch.equal(scheduler.timesteps.cpu(), ref["timesteps"])
    torch.testing.assert_close(scheduler.sigmas.cpu(), ref["sigmas"])
    assert released_step_index(scheduler.timesteps, 900) == ref["added_noise_sigma_index"] == 1


def test_released_step_index_quirk():
    timesteps = torch.tensor([999, 900, 900, 500])
    assert released_step_index(timesteps, 900) == 2  # present twice: the second
    assert released_step_index(timesteps, 999) == 0
    assert released_step_index(timesteps, 901) == 3  # absent: the last


def test_generator_draws_in_released_order(reference):
    ref = reference["pipeline"]
    draws = standard_normal_draws((1, 4, 15, 25), torch.Generator("cpu").manual_seed(1234))
    for ours, name in zip(draws, ("eps_posterior", "noise_first_timestep", "noise_added_level")):
        assert torch.equal(ours, ref[name])


def test_posterior(reference, tiny_pipeline):
    ref = reference["pipeline"]
    hint = ref["upscaled_input_uint8"].float().unsqueeze(0) / 255
    mean, std = tiny_pipeline.vae.encode_moments(hint)
    torch.testing.assert_close(mean, ref["posterior_mean"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(std, ref["posterior_std"], rtol=1e-4, atol=1e-4)


def test_initial_latents(reference, free_run):
    ref = reference["pipeline"]
    from_stored = initial_latents(
        ref["posterior_mean"],
        ref["posterior_std"],
        ref["timesteps"],
        ref["sigmas"],
        900,
        0.18215,
        [ref["eps_posterior"], ref["noise_first_timestep"], ref["noise_added_level"]],
    )
    assert torch.equal(from_stored, ref["initial_latents"])
    assert_pipeline_close(free_run[1]["initial_latents"][0], ref["initial_latents"])


def test_teacher_forced_noise_predictions(reference, tiny_pipeline):
    ref = reference["pipeline"]
    hint = ref["upscaled_input_uint8"].float().unsqueeze(0) / 255
    predict = tiny_pipeline.noise_predictor(ref["prompt_embeds"], hint, SETTINGS)
    inputs = [ref["initial_latents"], ref["latents_after_step"][0]]
    with torch.no_grad():
        for step, (t, latents) in enumerate(zip(ref["timesteps"], inputs)):
            assert_pipeline_close(predict(latents, t), ref["noise_pred_per_step"][step])


def test_scheduler_fed_stored_predictions(reference, tiny_pipeline):
    ref = reference["pipeline"]
    scheduler = tiny_pipeline.new_scheduler(2)
    latents = ref["initial_latents"]
    for step, t in enumerate(scheduler.timesteps):
        latents = scheduler.step(ref["noise_pred_per_step"][step], t, latents).prev_sample
        torch.testing.assert_close(latents, ref["latents_after_step"][step], rtol=0, atol=1e-5)


def test_free_running_steps(reference, free_run):
    ref = reference["pipeline"]
    for step in range(2):
        assert_pipeline_close(free_run[1]["noise_pred"][step], ref["noise_pred_per_step"][step])
        assert_pipeline_close(free_run[1]["latents_after_step"][step], ref["latents_after_step"][step])


def test_decoder(reference, tiny_pipeline, free_run):
    ref = reference["pipeline"]
    with torch.no_grad():
        decoded = tiny_pipeline.vae.decode(ref["latents_to_decode"])
    torch.testing.assert_close(decoded, ref["decoded"], rtol=0, atol=2e-3)
    torch.testing.assert_close(
        free_run[1]["decoded"][0], ref["decoded"], rtol=0, atol=1e-3 * ref["decoded"].abs().max().item()
    )


def test_postprocess_and_color_fix_are_exact_on_stored_inputs(reference):
    ref = reference["pipeline"]
    assert torch.equal(decoded_to_uint8(ref["decoded"]), ref["pipeline_output_uint8"])
    fixed = wavelet_color_fix(ref["pipeline_output_uint8"], ref["upscaled_input_uint8"])
    assert torch.equal(fixed, ref["color_fixed_uint8"])


def test_free_running_images(reference, free_run):
    ref = reference["pipeline"]
    result, seen = free_run
    assert_images_close(seen["pipeline_output_uint8"][0], ref["pipeline_output_uint8"])
    assert_images_close(seen["color_fixed_uint8"][0], ref["color_fixed_uint8"])
    assert result.image.size == (200, 120)
    assert_images_close(image_to_tensor(result.image), ref["final_uint8"])
