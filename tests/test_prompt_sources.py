"""Per-image prompts (sidecar > prompt file > caption > none), the caption cache, and the
captioner manifests. The captioner is the tiny random BLIP built at test time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import LR_INPUT
from PIL import Image, PngImagePlugin
from tiny_captioners import one_torch_thread

from pasd_cli.engine import ADDED_PROMPT, CaptionSettings
from pasd_cli.engine.captions import DescriberSpec, Description
from pasd_cli.errors import InputError, UsageError
from pasd_cli.imageio import read_rgb
from pasd_cli.prompts.cache import CaptionCache, image_digest
from pasd_cli.prompts.sources import ImagePrompt, PromptFile, PromptResolver, describer_missing, read_sidecar

MODELS = Path(__file__).parent.parent / "models"


@pytest.fixture
def batch(tmp_path) -> list[Path]:
    """Four different small images in one folder."""
    lr = Image.open(LR_INPUT).convert("RGB")
    images = [
        lr,
        lr.rotate(90, expand=True),
        Image.new("RGB", (40, 30), (0, 0, 255)),
        Image.new("RGB", (50, 30), (255, 0, 0)),
    ]
    folder = tmp_path / "in"
    folder.mkdir()
    paths = []
    for name, image in zip("abcd", images):
        image.save(folder / f"{name}.png")
        paths.append(folder / f"{name}.png")
    return paths


def resolver(tiny_blip_dir, cache=None, revision="r1", **kwargs) -> PromptResolver:
    spec = DescriberSpec("blip", tiny_blip_dir, "tiny/blip", revision, kwargs.pop("settings", CaptionSettings()))
    return PromptResolver("blip", spec, device=torch.device("cpu"), dtype=torch.float32, cache=cache, **kwargs)


def run(resolver_, paths) -> list[ImagePrompt]:
    return [resolver_.resolve(path, lambda path=path: read_rgb(path)) for path in paths]


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_torch_thread()


# --- sidecars ---------------------------------------------------------------------------------


def test_sidecar_text_rules(tmp_path):
    image = tmp_path / "photo.jpg"
    assert read_sidecar(image) is None
    sidecar = tmp_path / "photo.txt"
    sidecar.write_bytes("\ufeff  a red barn,\n  at dusk\t in  snow, \n".encode())
    assert read_sidecar(image) == "a red barn, at dusk in snow"
    sidecar.write_text("   \n")
    assert read_sidecar(image) == ""
    sidecar.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(InputError, match="photo.txt: prompt sidecar is not UTF-8"):
        read_sidecar(image)
    sidecar.write_text("x" * 20000)
    with pytest.raises(InputError, match="20000 bytes"):
        read_sidecar(image)


def test_sidecar_prompt_is_combined_like_a_label_and_not_cleaned():
    chosen = ImagePrompt("sidecar", "a blurry red barn")
    assert chosen.build("", ADDED_PROMPT) == "a blurry red barn, clean, high-resolution, 8k"
    assert chosen.build("old photo", ADDED_PROMPT) == "old photo, a blurry red barn, clean, high-resolution, 8k"
    assert ImagePrompt("sidecar", "").build("old photo", ADDED_PROMPT) == "old photo, clean, high-resolution, 8k"
    assert chosen.to_json() == {"prompt_source": "sidecar", "prompt_text": "a blurry red barn"}


# --- the prompt file --------------------------------------------------------------------------


def write(path: Path, text: str, encoding="utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def test_prompt_file_names_paths_header_and_quoting(tmp_path):
    csv_path = write(
        tmp_path / "prompts.csv",
        "\ufefffile,prompt\n"
        "photo.png,by name\n"
        "\n"
        'sub/photo.png,"by path, with a comma"\n'
        'multi.png,"two\nlines"\n'
        "unused.png,never matched\n"
        "empty.png,\n",
    )
    prompts = PromptFile.read(csv_path)
    assert prompts.lookup(tmp_path / "sub" / "photo.png") == "by path, with a comma"
    assert prompts.lookup(tmp_path / "other" / "photo.png") == "by name"
    assert prompts.lookup(tmp_path / "deep" / "er" / "multi.png") == "two lines"
    assert prompts.lookup(tmp_path / "empty.png") == ""
    assert prompts.lookup(tmp_path / "absent.png") is None
    assert prompts.unused() == ["unused.png"]


def test_prompt_file_without_header(tmp_path):
    prompts = PromptFile.read(write(tmp_path / "p.csv", "file.png,prompt one\n"))
    assert prompts.entries == {"file.png": "prompt one"}


@pytest.mark.parametrize(
    "text,message",
    [
        ("a.png,one\nb.png,a dog, on grass\n", "line 2: 3 fields; expected 2"),
        ("a.png\n", "line 1: 1 fields"),
        ("a.png,one\na.png,two\n", "line 2: a.png is listed twice"),
        (" ,orphan\n", "line 1: empty file name"),
        ('a.png,"unterminated\n', "not valid CSV"),
    ],
)
def test_malformed_prompt_files_are_usage_errors(tmp_path, text, message):
    with pytest.raises(UsageError, match=message):
        PromptFile.read(write(tmp_path / "p.csv", text))


def test_unreadable_prompt_files_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        PromptFile.read(tmp_path / "absent.csv")
    with pytest.raises(UsageError, match="not UTF-8"):
        PromptFile.read(write(tmp_path / "p.csv", "caf\xe9.png,x\n", "latin-1"))


def test_three_field_error_hints_at_quoting(tmp_path):
    with pytest.raises(UsageError) as caught:
        PromptFile.read(write(tmp_path / "p.csv", "a.png,a dog, on grass\n"))
    assert "quote" in caught.value.hint


# --- precedence -------------------------------------------------------------------------------


def test_sidecar_beats_prompt_file_beats_caption(tiny_blip_dir, batch, tmp_path):
    a, b, c, d = batch
    write(a.with_suffix(".txt"), "sidecar for a\n")
    write(c.with_suffix(".txt"), "sidecar for c\n")
    prompts = PromptFile.read(write(tmp_path / "prompts.csv", "b.png,csv for b\nc.png,csv for c\n"))
    with resolver(tiny_blip_dir, prompt_file=prompts) as resolve:
        chosen = run(resolve, batch)
        assert [(p.source, p.text) for p in chosen[:3]] == [
            ("sidecar", "sidecar for a"),
            ("prompt-file", "csv for b"),
            ("sidecar", "sidecar for c"),
        ]
        assert chosen[3].source == "blip" and chosen[3].text == chosen[3].description.caption
        assert resolve.stats.to_json() == {
            "sidecar": 2,
            "prompt_file": 1,
            "captions_computed": 1,
            "caption_cache_hits": 0,
            "none": 0,
        }
    assert not resolve.loaded  # closed


def test_per_image_prompts_never_load_the_captioner(tiny_blip_dir, batch, tmp_path):
    for path in batch:
        write(path.with_suffix(".txt"), f"about {path.stem}")
    resolve = resolver(tiny_blip_dir)
    chosen = [resolve.resolve(path, lambda: pytest.fail("image read")) for path in batch]
    assert [p.text for p in chosen] == ["about a", "about b", "about c", "about d"]
    assert not resolve.loaded and resolve.stats.described == 0


def test_caption_none_still_honours_per_image_prompts(batch, tmp_path):
    write(batch[0].with_suffix(".txt"), "sidecar for a")
    resolve = PromptResolver("none", prompt_file=PromptFile.read(write(tmp_path / "p.csv", "b.png,csv b\n")))
    chosen = [resolve.resolve(path, lambda: pytest.fail("image read")) for path in batch]
    assert [(p.source, p.text) for p in chosen] == [
        ("sidecar", "sidecar for a"),
        ("prompt-file", "csv b"),
        ("none", None),
        ("none", None),
    ]


def test_sidecars_can_be_turned_off(tiny_blip_dir, batch):
    write(batch[0].with_suffix(".txt"), "ignored")
    resolve = resolver(tiny_blip_dir, use_sidecars=False)
    assert resolve.resolve(batch[0], lambda: read_rgb(batch[0])).source == "blip"


def test_a_bad_sidecar_fails_its_image_only(tiny_blip_dir, batch):
    write(batch[0].with_suffix(".txt"), "caf\xe9", "latin-1")
    resolve = resolver(tiny_blip_dir)
    with pytest.raises(InputError):
        resolve.resolve(batch[0], lambda: read_rgb(batch[0]))
    assert resolve.resolve(batch[1], lambda: read_rgb(batch[1])).source == "blip"


def test_resolver_needs_a_matching_describer(tiny_blip_dir):
    with pytest.raises(ValueError):
        PromptResolver("classify", DescriberSpec("blip", tiny_blip_dir, "x"), device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError):
        PromptResolver("blip", DescriberSpec("blip", tiny_blip_dir, "x"))


# --- the cache --------------------------------------------------------------------------------


def test_second_run_computes_no_caption(tiny_blip_dir, batch, tmp_path):
    cache_dir = tmp_path / "cache"
    with resolver(tiny_blip_dir, CaptionCache(cache_dir)) as first:
        captions = [p.text for p in run(first, batch)]
    assert first.stats.described == 4 and first.cache.stores == 4 and first.cache.hits == 0
    assert len(set(captions)) == 4

    second = resolver(tiny_blip_dir, CaptionCache(cache_dir))
    again = run(second, batch)
    assert [p.text for p in again] == captions and all(p.cached for p in again)
    assert second.stats.described == 0 and second.stats.cache_hits == 4 and second.cache.misses == 0
    assert not second.loaded  # the captioner was never even loaded
    assert again[0].to_json()["caption_cached"] is True


def test_a_different_captioner_identity_misses(tiny_blip_dir, batch, tmp_path):
    cache = tmp_path / "cache"
    run(resolver(tiny_blip_dir, CaptionCache(cache)), batch)
    for other in (
        resolver(tiny_blip_dir, CaptionCache(cache), revision="r2"),
        resolver(tiny_blip_dir, CaptionCache(cache), settings=CaptionSettings(num_beams=1)),
    ):
        run(other, batch)
        assert other.stats.cache_hits == 0 and other.stats.described == 4


def test_same_pixels_in_another_file_hit_and_changed_pixels_miss(tiny_blip_dir, batch, tmp_path):
    cache = tmp_path / "cache"
    run(resolver(tiny_blip_dir, CaptionCache(cache)), batch[:1])
    copy = tmp_path / "elsewhere" / "renamed.png"
    copy.parent.mkdir()
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "metadata changes the file, not the pixels")
    Image.open(batch[0]).save(copy, pnginfo=info)
    assert copy.read_bytes() != batch[0].read_bytes()
    edited = tmp_path / "edited.png"
    pixels = Image.open(batch[0]).convert("RGB")
    pixels.putpixel((0, 0), (1, 2, 3))
    pixels.save(edited)
    later = resolver(tiny_blip_dir, CaptionCache(cache))
    run(later, [copy, edited])
    assert later.stats.cache_hits == 1 and later.stats.described == 1


def test_exif_rotation_changes_the_digest(tmp_path):
    image = Image.open(LR_INPUT).convert("RGB")
    plain, rotated = tmp_path / "plain.jpg", tmp_path / "rotated.jpg"
    image.save(plain, quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(rotated, quality=95, exif=exif)
    assert image_digest(read_rgb(plain)) != image_digest(read_rgb(rotated))
    assert image_digest(read_rgb(plain)) == image_digest(read_rgb(plain).copy())


def test_cache_records_are_checked_and_rewritten(tmp_path):
    cache = CaptionCache(tmp_path / "cache")
    identity, digest = {"kind": "blip", "model": "m", "revision": "r"}, "ab" * 32
    described = Description(caption="a dog")
    cache.put(identity, digest, described)
    path = cache.path(identity, digest)
    record = json.loads(path.read_text())
    assert record == {
        "format": 1,
        "identity": identity,
        "image_sha256": digest,
        "description": {"caption": "a dog", "label": None, "top_class": None, "probability": None},
    }
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary files left
    assert cache.get(identity, digest) == described

    for broken in (
        "{not json",
        json.dumps({**record, "identity": {"kind": "other"}}),
        json.dumps({**record, "description": {"caption": 3}}),
        "[]",
    ):
        path.write_text(broken)
        assert cache.get(identity, digest) is None
    assert (cache.hits, cache.misses) == (1, 4)
    cache.put(identity, digest, described)
    assert cache.get(identity, digest) == described


def test_an_unwritable_cache_does_not_fail_the_batch(tiny_blip_dir, batch, tmp_path):
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder should be")
    resolve = resolver(tiny_blip_dir, CaptionCache(blocked))
    assert run(resolve, batch[:1])[0].source == "blip"
    assert resolve.cache.write_errors == 1 and "cannot write the caption cache" in resolve.cache.last_write_error


# --- manifests --------------------------------------------------------------------------------


def test_captioner_manifests_follow_the_model_schema():
    from pasd_cli.store import load_manifests

    manifests = load_manifests()  # the store's parser validates the schema
    blip, resnet = manifests["blip"], manifests["resnet-50"]
    for manifest in (blip, resnet):
        assert "model.safetensors" in manifest.files and not any(f.endswith(".bin") for f in manifest.files)
        assert "config.json" in manifest.files and "preprocessor_config.json" in manifest.files
    assert (blip.kind, blip.repo_id) == ("captioner", "Salesforce/blip-image-captioning-base")
    assert {"tokenizer.json", "vocab.txt", "tokenizer_config.json"} <= set(blip.files)
    assert (resnet.kind, resnet.repo_id) == ("classifier", "microsoft/resnet-50")


def test_missing_describer_error_names_both_ways_forward():
    error = describer_missing("blip", "Salesforce/blip-image-captioning-base", "offline and not downloaded")
    assert error.exit_code == 3
    assert "Salesforce/blip-image-captioning-base" in str(error) and "offline" in str(error)
    assert "pasd download" in error.hint and "--caption none" in error.hint
