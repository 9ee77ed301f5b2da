"""Colorization against the released implementation's run (reference README, "Colorization
reference"), through the engine with the released luma merge.

Free-running stages use the README's tolerances; stages fed the stored inputs (teacher forcing)
localise a mismatch.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch
from conftest import COLOR_INPUT, COLOR_REFERENCE
from PIL import Image

from pasd_cli.engine.colorize import COLOR_NEGATIVE_PROMPT, ColorizeSettings, colorize_hint, colorize_size
from pasd_cli.engine.linear_resize import resize_linear
from pasd_cli.engine.noise import initial_latents, released_step_index
from pasd_cli.engine.pipeline import decoded_to_uint8, image_to_tensor
from pasd_cli.engine.yuv import luma, released_merge, rgb_to_yuv

# The public run: test_pasd's defaults but 2 steps, seed 1234, process size 64, no captioner.
SETTINGS = ColorizeSettings(exact=True, steps=2, seed=1234, guidance=9.0, process_size=64, luma="released")


def assert_pipeline_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """README: eps/latents within 1e-3 * max|ref|."""
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-3 * theirs.abs().max().item())


def image_diff(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[int, float]:
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == torch.uint8
    diff = (ours.int() - theirs.int()).abs()
    return diff.max().item(), diff.float().mean().item()


@pytest.fixture(scope="module")
def ref(color_reference):
    return color_reference["public"]


@pytest.fixture(scope="module")
def free_run(tiny_colorizer):
    seen = defaultdict(list)
    result = tiny_colorizer.colorize(
        Image.open(COLOR_INPUT), SETTINGS, trace=lambda name, value: seen[name].append(value)
    )
    return result, seen


def test_fixture_files_agree_with_the_bundle(ref):
    assert torch.equal(image_to_tensor(Image.open(COLOR_INPUT)), ref["input_uint8"])
    assert torch.equal(image_to_tensor(Image.open(COLOR_REFERENCE / "color_public_output.png")), ref["final_uint8"])


def test_grey_input_sizes_and_pipeline_input(ref, free_run):
    sizes = ref["meta"]["sizes_wh"]
    gray = Image.open(COLOR_INPUT).convert("RGB").convert("L")
    assert torch.equal(torch.from_numpy(np.asarray(gray).copy()).unsqueeze(0), ref["gray_uint8"])
    assert colorize_size(gray.size, 64) == tuple(sizes["after_resize_preproc"]) == (89, 64)
    hint = colorize_hint(gray.convert("RGB"), 64)
    assert hint.size == tuple(sizes["pipeline_input"]) == (88, 64)
    assert torch.equal(image_to_tensor(hint), ref["pipeline_input_uint8"])
    result, seen = free_run
    assert torch.equal(seen["gray_uint8"][0], ref["gray_uint8"])
    assert torch.equal(seen["upscaled_input_uint8"][0], ref["pipeline_input_uint8"])
    assert tuple(seen["initial_latents"][0].shape[-2:]) == tuple(sizes["latent_hw"])
    assert result.hint_size == (88, 64) and result.image.size == tuple(sizes["final"])


def test_prompt_strings(ref, free_run):
    call = ref["pipeline_call"]
    assert free_run[0].prompt == free_run[1]["prompt"][0] == call["prompt"] == ""
    assert SETTINGS.negative_prompt == COLOR_NEGATIVE_PROMPT == call["negative_prompt"]


def test_prompt_embeddings(ref, free_run):
    torch.testing.assert_close(free_run[1]["prompt_embeds"][0], ref["prompt_embeds"], rtol=1e-4, atol=1e-4)


def test_scheduler_from_the_folder_beside_the_checkpoint(ref, tiny_colorizer):
    scheduler = tiny_colorizer.new_scheduler(2)
    # The released class, or its subclass that runs on every device (engine/schedulers.py).
    assert ref["scheduler_class"] in {cls.__name__ for cls in type(scheduler).__mro__}
    for key, value in ref["scheduler_config"].items():
        if not key.startswith("_") and key in scheduler.config:
            assert scheduler.config[key] == value, key
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.alphas_cumprod[-1].item() == pytest.approx(ref["alphas_cumprod_last"], rel=1e-6)
    assert torch.equal(scheduler.timesteps.cpu(), ref["timesteps"])
    torch.testing.assert_close(scheduler.sigmas.cpu(), ref["sigmas"])
    assert released_step_index(scheduler.timesteps, 900) == ref["added_noise_sigma_index"] == 1


def test_initial_latents(ref, free_run):
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


def test_teacher_forced_v_predictions(ref, tiny_colorizer):
    hint = ref["pipeline_input_uint8"].float().unsqueeze(0) / 255
    predict = tiny_colorizer.noise_predictor(ref["prompt_embeds"], hint, SETTINGS)
    inputs = [ref["initial_latents"], ref["latents_after_step"][0]]
    with torch.no_grad():
        for step, (t, latents) in enumerate(zip(ref["timesteps"], inputs)):
            assert_pipeline_close(predict(latents, t), ref["noise_pred_per_step"][step])


def test_scheduler_fed_stored_predictions(ref, tiny_colorizer):
    scheduler = tiny_colorizer.new_scheduler(2)
    latents = ref["initial_latents"]
    for step, t in enumerate(scheduler.timesteps):
        latents = scheduler.step(ref["noise_pred_per_step"][step], t, latents).prev_sample
        assert_pipeline_close(latents, ref["latents_after_step"][step])


def test_free_running_steps(ref, free_run):
    seen = free_run[1]
    for step in range(2):
        assert_pipeline_close(seen["noise_pred"][step], ref["noise_pred_per_step"][step])
        assert_pipeline_close(seen["latents_after_step"][step], ref["latents_after_step"][step])


def test_decoder(ref, tiny_colorizer, free_run):
    with torch.no_grad():
        decoded = tiny_colorizer.vae.decode(ref["latents_to_decode"])
    torch.testing.assert_close(decoded, ref["decoded"], rtol=0, atol=2e-3)
    assert_pipeline_close(free_run[1]["decoded"][0], ref["decoded"])
    assert torch.equal(decoded_to_uint8(ref["decoded"]), ref["pipeline_output_uint8"])


def test_post_processing_from_the_stored_pipeline_output(ref):
    """README allows 1 level on the resize and 3 on the merge without cv2; ours is cv2's
    arithmetic, so both are exact."""
    output = ref["pipeline_output_uint8"].permute(1, 2, 0).numpy()
    resized = resize_linear(output, (56, 40))
    assert image_diff(torch.from_numpy(resized).permute(2, 0, 1), ref["color_resized_uint8"]) == (0, 0.0)
    merged = released_merge(ref["gray_uint8"][0].numpy(), ref["color_resized_uint8"].permute(1, 2, 0).numpy())
    assert image_diff(torch.from_numpy(merged).permute(2, 0, 1), ref["final_uint8"]) == (0, 0.0)


def test_free_running_images(ref, free_run):
    result, seen = free_run
    worst, mean = image_diff(seen["pipeline_output_uint8"][0], ref["pipeline_output_uint8"])
    assert worst <= 2 and mean < 0.05
    worst, mean = image_diff(seen["color_resized_uint8"][0], ref["color_resized_uint8"])
    assert worst <= 2 and mean < 0.05
    worst, mean = image_diff(image_to_tensor(result.image), ref["final_uint8"])
    assert worst <= 3 and mean < 0.05, (worst, mean)
    assert torch.equal(seen["final_uint8"][0], image_to_tensor(result.image))


def test_released_merge_moves_luma_as_the_readme_says(ref, free_run):
    """README: up to 28 levels off on this output; `luma_shift` reports it."""
    gray = ref["gray_uint8"][0].numpy()
    released = np.abs(luma(ref["final_uint8"].permute(1, 2, 0).numpy()) - gray)
    assert released.max() == 28
    assert free_run[0].luma_shift == 28


def test_exact_luma_on_the_public_run(ref, tiny_colorizer, free_run):
    result = tiny_colorizer.colorize(
        Image.open(COLOR_INPUT), ColorizeSettings(**{**SETTINGS.__dict__, "luma": "exact"})
    )
    gray = ref["gray_uint8"][0].numpy().astype(np.int64)
    rgb = np.asarray(result.image)
    assert np.abs(luma(rgb) - gray).max() <= 1 and result.luma_shift <= 1
    # Where the released merge saturated nothing (neither U, V nor R, G, B), the two merges
    # agree up to its fixed-point rounding.
    released = ref["final_uint8"].permute(1, 2, 0).numpy().astype(np.int64)
    _, u, v = rgb_to_yuv(ref["color_resized_uint8"].permute(1, 2, 0).numpy())
    unsaturated = [(u > 0) & (u < 255) & (v > 0) & (v < 255), (released > 0).all(-1) & (released < 255).all(-1)]
    inside = unsaturated[0] & unsaturated[1]
    assert inside.mean() > 0.5
    assert np.abs(rgb.astype(np.int64) - released)[inside].max() <= 2
