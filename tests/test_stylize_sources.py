"""Where a stylize base or LoRA comes from, and the checks made before any weights are read: what a
hub repo id fetches, how --style / --lora specs resolve, and the torch-free pre-flight checks."""

from __future__ import annotations

import json

import pytest

from pasd_cli.cli.app import hint_for
from pasd_cli.engine.formats import DIFFUSERS_FOLDER, SINGLE_FILE, UNET_FOLDER, check_base, check_lora_file
from pasd_cli.errors import ModelError
from pasd_cli.store import Kind, Manifest, ModelRef, Origin, load_manifests, locate
from pasd_cli.store.hub_bases import is_repo_id, pick_base_files, store_name

PATH, STORE, HUB = Origin.PATH, Origin.STORE, Origin.HUB


def base_source(spec, manifests):
    return locate(ModelRef(spec, Kind.STYLE, "--style"), manifests)


def lora_source(spec, manifests):
    return locate(ModelRef(spec, Kind.LORA, "--lora"), manifests)


TOKENIZER = [
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
]
DIFFUSERS = [
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    *TOKENIZER,
]


def test_a_diffusers_repo_gives_its_parts_safetensors_only():
    listing = [
        *DIFFUSERS,
        "model_index.json",
        "scheduler/scheduler_config.json",
        "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/pytorch_model.bin",
        "safety_checker/model.safetensors",
        "feature_extractor/preprocessor_config.json",
        "style-v1.ckpt",
        "style-v1.safetensors",
        "README.md",
    ]
    assert sorted(pick_base_files(listing, "a/b")) == sorted(DIFFUSERS)


def test_fp16_and_sharded_weights_are_taken_when_there_is_no_full_file():
    listing = [
        "unet/config.json",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "text_encoder/config.json",
        "text_encoder/model.safetensors.index.json",
        "text_encoder/model-00001-of-00002.safetensors",
        "text_encoder/model-00002-of-00002.safetensors",
    ]
    assert sorted(pick_base_files(listing, "a/b")) == sorted(
        [
            "unet/config.json",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "text_encoder/config.json",
            "text_encoder/model.safetensors.index.json",
            "text_encoder/model-00001-of-00002.safetensors",
            "text_encoder/model-00002-of-00002.safetensors",
        ]
    )


def test_a_unet_only_repo_gives_its_root_unet():
    listing = ["config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "README.md"]
    assert sorted(pick_base_files(listing, "a/b")) == ["config.json", "diffusion_pytorch_model.safetensors"]


@pytest.mark.parametrize(
    "listing,message",
    [
        (["unet/config.json", "unet/diffusion_pytorch_model.bin"], "unet has no safetensors weights"),
        ([*DIFFUSERS, "text_encoder_2/config.json"], "SDXL"),
        (["style-v1.safetensors", "README.md"], "not a Stable Diffusion model in diffusers layout"),
    ],
)
def test_repos_that_are_no_sd15_base_are_refused(listing, message):
    with pytest.raises(ModelError, match=message):
        pick_base_files(listing, "a/b")


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("nitrosocke/mo-di-diffusion", True),
        ("Lykon/DreamShaper", True),
        ("a/b/c", False),
        ("sd15", False),
        ("./a/b", False),
        ("models/style.safetensors", False),
        ("~/x", False),
        ("owner/", False),
    ],
)
def test_repo_ids(spec, expected):
    assert is_repo_id(spec) is expected


def test_store_folder_of_a_hub_base_cannot_be_a_manifest_name():
    assert store_name("nitrosocke/mo-di-diffusion") == "hub--nitrosocke--mo-di-diffusion"
    assert not any(name.startswith("hub--") for name in load_manifests())


def test_base_and_lora_specs_resolve_in_order(tmp_path, monkeypatch):
    manifests = load_manifests()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "name").mkdir()
    assert base_source("owner/name", manifests).origin == PATH  # an existing folder wins
    assert base_source("other/name", manifests).origin == HUB
    with pytest.raises(ModelError, match="'sd15' has no UNet"):
        base_source("sd15", manifests)
    personal = Manifest(
        name="toon",
        kind="base",
        description="",
        repo_id="a/toon",
        revision="main",
        subfolder="",
        files=("unet/config.json", "unet/diffusion_pytorch_model.safetensors"),
        license="x",
    )
    assert base_source("toon", {**manifests, "toon": personal}).origin == STORE
    with pytest.raises(ModelError, match="is a lora model, not a base") as refused:
        base_source("lcm-lora-sdv1-5", manifests)
    assert "--lora" in hint_for(refused.value)
    with pytest.raises(ModelError, match="no such file"):
        base_source("missing.safetensors", manifests)
    assert lora_source("lcm-lora-sdv1-5", manifests).origin == STORE
    assert lora_source("style.safetensors", manifests).origin == PATH
    with pytest.raises(ModelError, match="is a base model, not a LoRA"):
        lora_source("sd15", manifests)


def test_lcm_lora_manifest():
    manifest = load_manifests()["lcm-lora-sdv1-5"]
    assert (manifest.kind, manifest.repo_id, manifest.files) == (
        "lora",
        "latent-consistency/lcm-lora-sdv1-5",
        ("pytorch_lora_weights.safetensors",),
    )


def test_preflight_refuses_pickles_inside_folders_unless_trusted(tmp_path):
    unet = tmp_path / "unet-only"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    (unet / "diffusion_pytorch_model.bin").write_bytes(b"never read")
    with pytest.raises(ModelError, match="is a pickle"):
        check_base(unet)
    assert check_base(unet, trust_pickle=True) == UNET_FOLDER
    (unet / "diffusion_pytorch_model.safetensors").write_bytes(b"")  # safetensors first, as loading does
    assert check_base(unet) == UNET_FOLDER

    full = tmp_path / "full"
    (full / "unet").mkdir(parents=True)
    (full / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (full / "vae").mkdir()
    (full / "vae" / "diffusion_pytorch_model.ckpt").write_bytes(b"never read")
    with pytest.raises(ModelError, match="is a pickle"):
        check_base(full)
    assert check_base(full, trust_pickle=True) == DIFFUSERS_FOLDER


def test_preflight_reads_only_the_header(tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "checkpoint.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, str(path))
    assert check_base(path) == SINGLE_FILE
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ModelError, match="cannot read"):
        check_base(damaged)
    with pytest.raises(ModelError, match="full model, not a LoRA"):
        check_lora_file(path)
    with pytest.raises(ModelError, match="LoRA file not found"):
        check_lora_file(tmp_path / "missing.safetensors")
