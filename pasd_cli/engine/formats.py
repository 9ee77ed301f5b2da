"""What a weights file or a base model folder is, from names, layouts and safetensors headers
alone. Nothing here imports torch, so the command line can refuse a pickle, an unknown format or
a wrong kind of model before it loads anything heavy."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import ModelError
from ..nn.keys import read_keys as safetensors_keys

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
TRUST_PICKLE_HINT = (
    "convert it to .safetensors, or trust it to be read with restricted unpickling, "
    "which loads tensors and plain containers only"
)

SINGLE_FILE = "single-file"
UNET_FOLDER = "unet-folder"
DIFFUSERS_FOLDER = "diffusers-folder"
# Weights of each part of a diffusers folder, by file stem.
PART_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}

LDM_UNET_PREFIX = "model.diffusion_model."
LORA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_LORA_KEY = re.compile(r"\.(lora_down|lora_up|lora_A|lora_B)\.")
# Key families of other Stable Diffusion generations: SDXL's two text encoders sit under
# `conditioner.`, SD 2.x's OpenCLIP under `cond_stage_model.model.`.
_OTHER_FAMILIES = {"conditioner.": "SDXL", "cond_stage_model.model.": "Stable Diffusion 2"}


def is_pickle(path: Path) -> bool:
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def refuse_untrusted_pickle(path: Path, trust_pickle: bool) -> None:
    path = Path(path)
    if is_pickle(path) and not trust_pickle:
        raise ModelError(
            f"{path} is a pickle ({path.suffix}); reading it could run code, so it is refused",
            hint=TRUST_PICKLE_HINT,
            field="trust_pickle",
        )


def base_kind(path: Path) -> str:
    path = Path(path)
    if path.is_dir():
        if (path / "unet").is_dir():
            return DIFFUSERS_FOLDER
        if (path / "config.json").is_file():
            return UNET_FOLDER
        raise ModelError(f"{path}: neither a diffusers model folder (with unet/) nor a UNet folder (with config.json)")
    if path.is_file():
        if path.suffix.lower() in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
            return SINGLE_FILE
        raise ModelError(
            f"{path}: unknown model format {path.suffix or '(no suffix)'}",
            hint="a base is a .safetensors checkpoint or a diffusers folder",
        )
    raise ModelError(f"base model not found: {path}")


def weight_files(folder: Path, stem: str) -> list[Path]:
    """The weights of one diffusers/transformers part: safetensors (full, fp16, or sharded) first,
    pickles last (they are refused later unless trusted)."""
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
        if (folder / name).is_file():
            return [folder / name]
    for index in (f"{stem}.safetensors.index.json", f"{stem}.safetensors.index.fp16.json"):
        if (folder / index).is_file():
            try:
                shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as exc:
                raise ModelError(f"cannot read {folder / index}: {exc}") from None
            return [folder / shard for shard in shards]
    for name in (f"{stem}.bin", f"{stem}.fp16.bin", f"{stem}.ckpt"):
        if (folder / name).is_file():
            return [folder / name]
    raise ModelError(f"{folder} holds no {stem}.safetensors")


def is_lora_keys(keys) -> bool:
    return any(k.startswith(LORA_PREFIXES) or _LORA_KEY.search(k) for k in keys)


def check_single_file_keys(keys, source: Path) -> None:
    """A single-file base must hold an SD 1.5 UNet, in the LDM layout or diffusers'."""
    keys = list(keys)
    if is_lora_keys(keys):
        raise ModelError(f"{source} is a LoRA, not a base model", hint="pass it as a LoRA", field="loras")
    for prefix, family in _OTHER_FAMILIES.items():
        if any(k.startswith(prefix) for k in keys):
            raise ModelError(f"{source} is a {family} checkpoint; PASD's bases must be Stable Diffusion 1.5 models")
    if not any(k.startswith(LDM_UNET_PREFIX) for k in keys) and "conv_in.weight" not in keys:
        raise ModelError(
            f"{source} holds no Stable Diffusion UNet (no keys under {LDM_UNET_PREFIX}, nor a UNet in diffusers layout)"
        )


def check_base(path: Path, trust_pickle: bool = False) -> str:
    """The kind of base at `path`, after the checks that need no weights: the layout, pickles
    refused unless trusted (every weights file a folder would be read from), and the key families
    of a single safetensors file. Loading checks the rest (shapes, exact key sets)."""
    path = Path(path)
    kind = base_kind(path)
    if kind == SINGLE_FILE:
        refuse_untrusted_pickle(path, trust_pickle)
        if path.suffix.lower() in SAFETENSORS_SUFFIXES:
            check_single_file_keys(safetensors_keys(path), path)
        return kind
    parts = {"": "unet"} if kind == UNET_FOLDER else {p: p for p in PART_STEMS if (path / p).is_dir()}
    for folder, part in parts.items():
        for file in weight_files(path / folder if folder else path, PART_STEMS[part]):
            refuse_untrusted_pickle(file, trust_pickle)
    return kind


def check_lora_file(path: Path, trust_pickle: bool = False) -> None:
    path = Path(path)
    if not path.is_file():
        raise ModelError(
            f"LoRA file not found: {path}" if not path.exists() else f"{path} is not a file", field="loras"
        )
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
        raise ModelError(
            f"{path}: unknown weights format {path.suffix or '(no suffix)'}", hint="use a .safetensors file"
        )
    refuse_untrusted_pickle(path, trust_pickle)
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        keys = safetensors_keys(path)
        if not is_lora_keys(keys) and (any(k.startswith(LDM_UNET_PREFIX) for k in keys) or "conv_in.weight" in keys):
            raise ModelError(f"{path} is a full model, not a LoRA", hint="pass it as the style base", field="style")
