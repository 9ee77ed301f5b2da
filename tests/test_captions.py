"""High-level information (spec section 5): the BLIP captioner and the ImageNet classifier built
tiny at test time, the released prompt rules, and the caption reaching the text encoder."""

from __future__ import annotations

import gc
import shutil
import weakref
from collections import defaultdict
from dataclasses import replace

import pytest
import torch
from conftest import LR_INPUT
from PIL import Image
from test_parity_pipeline import SETTINGS, assert_images_close
from tiny_captioners import IMAGENET_NAMES, build_tiny_resnet, confident, one_torch_thread, uniform

from pasd_cli.engine import ADDED_PROMPT, NEGATIVE_PROMPT, CaptionSettings, UpscaleSettings
from pasd_cli.engine.captions import DescriberSpec, Description, folder_fingerprint, imagenet_label, top_class
from pasd_cli.engine.prompts import build_prompt, encode_texts
from pasd_cli.errors import ModelError
from pasd_cli.prompts.sources import PromptResolver

CPU = torch.device("cpu")


def blip_spec(folder, **settings) -> DescriberSpec:
    return DescriberSpec("blip", folder, "tiny/blip", "r1", CaptionSettings(**settings))


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def lr_image():
    return Image.open(LR_INPUT).convert("RGB")


@pytest.fixture(scope="module")
def captioner(tiny_blip_dir):
    return blip_spec(tiny_blip_dir).load(CPU, torch.float32)


# --- the released prompt rules, exactly -------------------------------------------------------


@pytest.mark.parametrize(
    "user,caption,label,expected",
    [
        # caption: cleaned, then " <user prompt>", then the added prompt with NO separator
        ("", "a dog on the grass", None, "a dog on the grassclean, high-resolution, 8k"),
        ("old photo", "a dog on the grass", None, "a dog on the grass old photoclean, high-resolution, 8k"),
        ("", "a blurry noisy photo of a cat ", None, "a clear clean photo of a catclean, high-resolution, 8k"),
        # a confident class: user prompt first, each followed by ", "
        ("", None, "tabby", "tabby, clean, high-resolution, 8k"),
        ("old photo", None, "tabby", "old photo, tabby, clean, high-resolution, 8k"),
        # none
        ("", None, None, "clean, high-resolution, 8k"),
        ("old photo", None, None, "old photo, clean, high-resolution, 8k"),
        # an empty caption or label is no information at all
        ("old photo", "  ", None, "old photo, clean, high-resolution, 8k"),
        ("", None, "", "clean, high-resolution, 8k"),
    ],
)
def test_prompt_strings(user, caption, label, expected):
    """Exact mode's rules (separator "")."""
    assert build_prompt(user, ADDED_PROMPT, caption=caption, label=label, separator="") == expected
    assert UpscaleSettings(exact=True).caption_separator == ""


@pytest.mark.parametrize(
    "user,caption,label,expected",
    [
        ("", "a dog on the grass", None, "a dog on the grass, clean, high-resolution, 8k"),
        ("old photo", "a dog on the grass", None, "a dog on the grass old photo, clean, high-resolution, 8k"),
        ("", "a dog", None, "a dog"),  # with no added prompt, nothing is appended
        ("", None, "tabby", "tabby, clean, high-resolution, 8k"),  # the other rules as released
        ("old photo", None, None, "old photo, clean, high-resolution, 8k"),
    ],
)
def test_default_prompts_join_a_caption_to_the_added_prompt(user, caption, label, expected):
    settings = UpscaleSettings(prompt=user, added_prompt=ADDED_PROMPT if expected != "a dog" else "")
    prompt = build_prompt(
        settings.prompt, settings.added_prompt, caption=caption, label=label, separator=settings.caption_separator
    )
    assert prompt == expected


def test_cleanup_is_the_released_substring_replacement():
    # The released code replaces substrings, so "noisy" inside a word is replaced too.
    assert build_prompt("", "", caption="blurry, noisy, annoisyed", separator="") == "clear, clean, ancleaned"


# --- BLIP --------------------------------------------------------------------------------------


def test_blip_caption_is_deterministic(tiny_blip_dir, captioner, lr_image):
    first = captioner.describe(lr_image)
    assert first == captioner.describe(lr_image)
    again = blip_spec(tiny_blip_dir).load(CPU, torch.float32).describe(lr_image)
    assert again == first
    assert first.caption and first.label is None and first.probability is None


def test_blip_generates_after_the_prefix_within_the_length_bounds(captioner, lr_image):
    """The released BLIP path primes the decoder with "a picture of " and cuts it off; lengths
    count the prefix. Checked against the library's own generate() output."""
    s = captioner.settings
    pixels = captioner.image_processor(images=lr_image, return_tensors="pt").pixel_values
    prefix = captioner.tokenizer(s.blip_prefix, return_tensors="pt").input_ids
    with torch.no_grad():
        ids = captioner.model.generate(
            pixel_values=pixels,
            input_ids=prefix,
            do_sample=False,
            num_beams=s.num_beams,
            min_length=s.min_length,
            max_length=s.max_length,
        )[0]
    bos = captioner.model.config.text_config.bos_token_id
    assert ids[0] == bos and ids[1 : prefix.shape[1] - 1].tolist() == prefix[0, 1:-1].tolist()
    assert s.min_length <= len(ids) <= s.max_length
    tail = captioner.tokenizer.decode(ids[prefix.shape[1] - 1 :], skip_special_tokens=True).strip()
    assert captioner.describe(lr_image).caption == tail


def test_generation_settings_change_the_caption(tiny_blip_dir, lr_image):
    short = blip_spec(tiny_blip_dir, min_length=4, max_length=6).load(CPU, torch.float32)
    long = blip_spec(tiny_blip_dir, min_length=12, max_length=12).load(CPU, torch.float32)
    short_caption, long_caption = short.describe(lr_image).caption, long.describe(lr_image).caption
    assert len(short.tokenizer(short_caption).input_ids) < len(long.tokenizer(long_caption).input_ids)


def test_blip_runs_in_the_dtype_it_is_given(tiny_blip_dir, lr_image):
    captioner = blip_spec(tiny_blip_dir).load(CPU, torch.bfloat16)
    assert {p.dtype for p in captioner.model.parameters()} == {torch.bfloat16}
    assert isinstance(captioner.describe(lr_image).caption, str)


def test_free_releases_the_weights(tiny_blip_dir, lr_image):
    captioner = blip_spec(tiny_blip_dir).load(CPU, torch.float32)
    model = weakref.ref(captioner.model)
    captioner.free()
    gc.collect()
    assert model() is None
    with pytest.raises(RuntimeError, match="after free"):
        captioner.describe(lr_image)


def test_missing_or_pickle_only_weights_are_model_errors(tmp_path, tiny_blip_dir):
    with pytest.raises(ModelError, match="captioner folder not found"):
        blip_spec(tmp_path / "absent").load(CPU, torch.float32)
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_blip_dir, pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(ModelError, match="cannot load"):
        blip_spec(pickled).load(CPU, torch.float32)


# --- the classifier ---------------------------------------------------------------------------


def test_imagenet_labels_keep_the_first_synonym():
    assert imagenet_label("tabby, tabby cat") == "tabby"
    assert imagenet_label("golden retriever") == "golden retriever"
    assert imagenet_label("crane") == "crane"


def test_released_threshold_is_inclusive_and_ties_take_the_first():
    names = dict(enumerate(IMAGENET_NAMES[:4]))
    # 0.25 is exact in float32, so this checks ">=" itself
    at = top_class(torch.tensor([0.25, 0.25, 0.25, 0.25]), names, 0.25)
    assert at == Description(label="tench", top_class="tench", probability=0.25)
    below = top_class(torch.tensor([0.02, 0.0999, 0.05, 0.05]), names, 0.1)
    assert below.label is None and below.top_class == "tabby"


@pytest.mark.parametrize(
    "probabilities,label,top,p",
    [
        (confident(1), "tabby", "tabby", 0.5),
        (confident(2, 0.12), "golden retriever", "golden retriever", 0.12),
        (uniform(), None, "tench", 0.05),
    ],
)
def test_classifier_rule_end_to_end(tmp_path, lr_image, probabilities, label, top, p):
    folder = build_tiny_resnet(tmp_path / "resnet", probabilities)
    classifier = DescriberSpec("classify", folder, "tiny/resnet", "r1").load(CPU, torch.float32)
    described = classifier.describe(lr_image)
    assert (described.label, described.top_class) == (label, top)
    assert described.probability == pytest.approx(p, abs=1e-5)
    assert described.caption is None


def test_classifier_preprocessing_is_the_hub_configs(tmp_path, lr_image):
    classifier = DescriberSpec("classify", build_tiny_resnet(tmp_path / "r"), "tiny/resnet").load(CPU, torch.float32)
    assert classifier._pixels(lr_image).shape == (1, 3, 224, 224)
    assert type(classifier.image_processor).__name__.endswith("Pil")


# --- identity ---------------------------------------------------------------------------------


def test_identity_names_model_revision_and_generation(tiny_blip_dir, tmp_path):
    base = blip_spec(tiny_blip_dir).identity()
    assert base["model"] == "tiny/blip" and base["revision"] == "r1" and base["num_beams"] == 3
    assert blip_spec(tiny_blip_dir, num_beams=1).identity() != base
    moved = tmp_path / "moved"
    shutil.copytree(tiny_blip_dir, moved)
    assert blip_spec(moved).identity() == base  # the folder's place is not part of it
    unpinned = DescriberSpec("blip", tiny_blip_dir, "tiny/blip").identity()
    assert unpinned["revision"] == folder_fingerprint(tiny_blip_dir)
    classify = DescriberSpec("classify", tiny_blip_dir, "tiny/resnet", "r1").identity()
    assert classify["min_probability"] == 0.1 and "num_beams" not in classify


def test_fingerprint_changes_when_a_file_changes(tmp_path, tiny_blip_dir):
    folder = tmp_path / "copy"
    shutil.copytree(tiny_blip_dir, folder)
    before = folder_fingerprint(folder)
    (folder / "preprocessor_config.json").write_text("{}  ")
    assert folder_fingerprint(folder) != before
    with pytest.raises(ModelError):
        folder_fingerprint(tmp_path / "absent")


# --- the caption reaches the text encoder -----------------------------------------------------


class _Stop(Exception):
    pass


def _prompt_and_embeddings(pipeline, image, settings, **kwargs):
    """Run the pipeline only as far as the prompt embeddings."""
    seen = {}

    def trace(name, value):
        seen[name] = value
        if name == "prompt_embeds":
            raise _Stop

    with pytest.raises(_Stop):
        pipeline.upscale(image, settings, trace=trace, **kwargs)
    return seen["prompt"], seen["prompt_embeds"]


def test_blip_caption_reaches_the_text_encoder(tiny_pipeline, tiny_blip_dir, lr_image):
    resolver = PromptResolver("blip", blip_spec(tiny_blip_dir), device=CPU, dtype=torch.float32, use_sidecars=False)
    chosen = resolver.resolve(LR_INPUT, lambda: lr_image)
    caption = chosen.description.caption
    assert chosen.source == "blip" and chosen.text == caption and caption
    prompt, embeds = _prompt_and_embeddings(tiny_pipeline, lr_image, SETTINGS, **chosen.pipeline_args())
    expected = (
        caption.replace("blurry", "clear").replace("noisy", "clean")
        + " a tiny test image"
        + "clean, high-resolution, 8k"
    )
    assert prompt == expected == chosen.build(SETTINGS.prompt, SETTINGS.added_prompt, SETTINGS.caption_separator)
    wanted = encode_texts(tiny_pipeline.tokenizer, tiny_pipeline.text_encoder, [NEGATIVE_PROMPT, expected])
    assert torch.equal(embeds, wanted)


def test_fixed_caption_string_reaches_the_text_encoder(tiny_pipeline, lr_image, reference):
    settings = UpscaleSettings(steps=2, scale=2, process_size=112, prompt="")
    caption = "a blurry noisy photo of a dog"
    exact, _ = _prompt_and_embeddings(tiny_pipeline, lr_image, replace(settings, exact=True), caption=caption)
    assert exact == "a clear clean photo of a dogclean, high-resolution, 8k"  # as released
    prompt, embeds = _prompt_and_embeddings(tiny_pipeline, lr_image, settings, caption=caption)
    assert prompt == "a clear clean photo of a dog, clean, high-resolution, 8k"
    wanted = encode_texts(tiny_pipeline.tokenizer, tiny_pipeline.text_encoder, [NEGATIVE_PROMPT, prompt])
    assert torch.equal(embeds, wanted)
    # and it is not the uncaptioned prompt's embedding
    assert not torch.allclose(embeds[1], reference["pipeline"]["prompt_embeds"][1], atol=1e-3)


def test_label_reaches_the_text_encoder(tiny_pipeline, lr_image):
    prompt, _ = _prompt_and_embeddings(tiny_pipeline, lr_image, SETTINGS, label="tabby")
    assert prompt == "a tiny test image, tabby, clean, high-resolution, 8k"


def test_caption_none_reproduces_the_parity_output(tiny_pipeline, lr_image, reference):
    """`--caption none` resolves to no high-level information: the released run of reference C,
    to the reference's tolerances."""
    chosen = PromptResolver("none", use_sidecars=False).resolve(LR_INPUT, lambda: pytest.fail("read"))
    assert chosen.source == "none" and chosen.pipeline_args() == {}
    seen = defaultdict(list)
    result = tiny_pipeline.upscale(lr_image, SETTINGS, trace=lambda n, v: seen[n].append(v), **chosen.pipeline_args())
    assert result.prompt == reference["pipeline"]["prompt"]
    torch.testing.assert_close(seen["prompt_embeds"][0], reference["pipeline"]["prompt_embeds"], rtol=1e-4, atol=1e-4)
    from pasd_cli.engine.pipeline import image_to_tensor

    assert_images_close(image_to_tensor(result.image), reference["pipeline"]["final_uint8"])


def test_captions_depend_on_the_image(captioner, lr_image):
    captions = {
        captioner.describe(image).caption
        for image in (lr_image, lr_image.rotate(90), Image.new("RGB", (50, 50), (0, 0, 255)))
    }
    assert len(captions) == 3
