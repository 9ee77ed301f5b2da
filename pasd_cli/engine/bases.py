"""Personalized Stable Diffusion 1.5 bases on a loaded PASD model (spec section 6).

The PASD UNet file holds the whole stock SD UNet plus the trained PACA layers. A personalized
base (a civitai/LDM single file, a DreamBooth UNet folder, a diffusers folder) replaces, or blends
into, the stock UNet tensors only: the PACA tensors always stay PASD's (the released code loses
them for folder bases). The base's VAE and text encoder replace the default ones when it has
them. Everything is changed in place on a `Components`.

Single files are converted with diffusers' own LDM converters, offline: the UNet with the loaded
PASD UNet's config, the VAE and text encoder with the configs of the parts they replace (or the
SD 1.5 configs shipped in `configs/sd15`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelError
from ..nn.loading import check_state_dict
from .loading import Components
from .weights import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, read_state_dict

SINGLE_FILE = "single-file"
UNET_FOLDER = "unet-folder"
DIFFUSERS_FOLDER = "diffusers-folder"

SD15_CONFIGS = Path(__file__).parent / "configs" / "sd15"
LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
LDM_CLIP_PREFIX = "cond_stage_model.transformer."
TEXT_MODEL_PREFIX = "text_model."
_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")


@dataclass(frozen=True)
class BaseReport:
    kind: str
    source: Path
    blend: float
    unet_tensors: int
    replaced: tuple[str, ...] = field(default=())


def sd15_config(part: str) -> dict:
    """The shipped SD 1.5 config of `part`: "unet", "vae" or "text_encoder"."""
    return json.loads((SD15_CONFIGS / f"{part}.json").read_text())


def base_kind(path: Path) -> str:
    path = Path(path)
    if path.is_dir():
        if (path / "unet").is_dir():
            return DIFFUSERS_FOLDER
        if (path / "config.json").is_file():
            return UNET_FOLDER
        raise ModelError(f"{path}: neither a diffusers model folder (with unet/) nor a UNet folder "
                         "(with config.json)")
    if path.is_file():
        if path.suffix.lower() in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
            return SINGLE_FILE
        raise ModelError(f"{path}: unknown model format {path.suffix or '(no suffix)'}",
                         hint="a base is a .safetensors checkpoint or a diffusers folder")
    raise ModelError(f"base model not found: {path}")


# --- the stock UNet tensors ------------------------------------------------------------------

def stock_unet(unet) -> torch.nn.Module:
    """A stock diffusers UNet of the same config, on the meta device: its keys and shapes are the
    PASD UNet's minus PACA, found from the architecture rather than from key names."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(dict(unet.config))


def stock_unet_keys(unet) -> list[str]:
    return list(stock_unet(unet).state_dict())


def blend_unet(unet, new_state: dict[str, torch.Tensor], alpha: float, source: Path) -> int:
    """current <- alpha * new + (1 - alpha) * current for every stock tensor; PACA untouched.
    Returns how many tensors were blended."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError("blend must be in [0, 1]")
    reference = stock_unet(unet)
    new_state = {k: v for k, v in new_state.items() if v is not None}
    check_state_dict(reference, new_state, source)
    current = unet.state_dict()
    with torch.no_grad():
        for key in reference.state_dict():
            target = current[key]
            # lerp is exact at both ends: weight 0 keeps `target`, weight 1 gives `new`.
            target.lerp_(new_state[key].to(target.device, target.dtype), alpha)
    return len(new_state)


# --- VAE and text encoder from a state dict ---------------------------------------------------

def build_vae(state: dict[str, torch.Tensor], config: dict, source: Path, dtype=torch.float32):
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(dict(config))
    check_state_dict(vae, state, source)
    vae.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return vae.eval().requires_grad_(False)


def _align_prefix(state: dict[str, torch.Tensor], expected: set[str], prefix: str) -> dict[str, torch.Tensor]:
    # transformers >= 5.6 dropped CLIPTextModel's `text_model.` wrapper; files have either form.
    wants = any(k.startswith(prefix) for k in expected)
    has = any(k.startswith(prefix) for k in state)
    if has and not wants:
        return {k.removeprefix(prefix): v for k, v in state.items()}
    if wants and not has:
        return {prefix + k: v for k, v in state.items()}
    return state


def build_text_encoder(state: dict[str, torch.Tensor], config, source: Path, dtype=torch.float32):
    from transformers import CLIPTextConfig, CLIPTextModel

    if not isinstance(config, CLIPTextConfig):
        config = CLIPTextConfig.from_dict(dict(config))
    with torch.device("meta"):
        skeleton = CLIPTextModel(config)
    expected = set(skeleton.state_dict())
    # position_ids is a buffer the model builds itself; old files carry it, sometimes damaged.
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    state = {k: v.to(dtype) for k, v in _align_prefix(state, expected, TEXT_MODEL_PREFIX).items()}
    check_state_dict(skeleton, state, source)
    model = CLIPTextModel.from_pretrained(None, config=config, state_dict=state)
    return model.eval().requires_grad_(False)


# --- single-file checkpoints (original LDM layout) --------------------------------------------

@dataclass
class SingleFileParts:
    unet: dict[str, torch.Tensor]
    vae: object | None
    text_encoder: object | None


def check_sd15_checkpoint(state: dict[str, torch.Tensor], source: Path) -> None:
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    if not any(k.startswith(LDM_UNET_PREFIX) for k in state):
        if state and all(k.startswith(_KOHYA_PREFIXES) for k in state):
            raise ModelError(f"{source} is a LoRA, not a base model", hint="pass it with --lora")
        raise ModelError(f"{source} holds no UNet in the original (LDM) layout "
                         f"(no keys under {LDM_UNET_PREFIX})")
    model_type = infer_diffusers_model_type(state)
    if model_type != "v1":
        raise ModelError(f"{source} is a Stable Diffusion '{model_type}' checkpoint; PASD's bases "
                         "must be Stable Diffusion 1.5 models")


def read_single_file(path: Path, unet_config: dict | None = None, vae_config: dict | None = None,
                     text_encoder_config=None, trust_pickle: bool = False,
                     dtype: torch.dtype = torch.float32) -> SingleFileParts:
    """Convert a civitai/LDM checkpoint with diffusers' converters; configs default to SD 1.5's."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint,
                                                     convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)

    path = Path(path)
    state = read_state_dict(path, trust_pickle)
    if "conv_in.weight" in state and not any(k.startswith(LDM_UNET_PREFIX) for k in state):
        return SingleFileParts(state, None, None)  # a lone UNet in diffusers layout
    check_sd15_checkpoint(state, path)
    unet = convert_ldm_unet_checkpoint(state, dict(sd15_config("unet") if unet_config is None else unet_config))
    vae = text_encoder = None
    if any(k.startswith(LDM_VAE_PREFIX) for k in state):
        config = dict(sd15_config("vae") if vae_config is None else vae_config)
        vae = build_vae(convert_ldm_vae_checkpoint(state, config), config, path, dtype)
    # Any CLIP key, not diffusers' marker key: older files lack the `text_model.` level.
    if any(k.startswith(LDM_CLIP_PREFIX) for k in state):
        config = sd15_config("text_encoder") if text_encoder_config is None else text_encoder_config
        text_encoder = build_text_encoder(convert_ldm_clip_checkpoint(state), config, path, dtype)
    return SingleFileParts(unet, vae, text_encoder)


def _dtype(module) -> torch.dtype:
    return next(module.parameters()).dtype


def apply_single_file(components: Components, path: Path, blend: float = 1.0,
                      trust_pickle: bool = False) -> BaseReport:
    parts = read_single_file(path, components.unet.config, components.vae.config,
                             components.text_encoder.config, trust_pickle, _dtype(components.vae))
    count = blend_unet(components.unet, parts.unet, blend, Path(path))
    replaced = []
    if parts.vae is not None:
        components.vae = parts.vae
        replaced.append("vae")
    if parts.text_encoder is not None:
        components.text_encoder = parts.text_encoder.to(_dtype(components.text_encoder))
        replaced.append("text_encoder")
    return BaseReport(SINGLE_FILE, Path(path), blend, count, tuple(replaced))


# --- folders -----------------------------------------------------------------------------------

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


def read_part(folder: Path, stem: str, trust_pickle: bool) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder, stem):
        state.update(read_state_dict(path, trust_pickle))
    return state


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from None


def read_unet_folder(folder: Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    config = _read_json(folder / "config.json")
    kind = config.get("_class_name", "UNet2DConditionModel")
    if kind != "UNet2DConditionModel":
        raise ModelError(f"{folder} holds a {kind}, not a Stable Diffusion UNet")
    return read_part(folder, "diffusion_pytorch_model", trust_pickle)


def apply_unet_folder(components: Components, folder: Path, blend: float = 1.0,
                      trust_pickle: bool = False) -> BaseReport:
    folder = Path(folder)
    count = blend_unet(components.unet, read_unet_folder(folder, trust_pickle), blend, folder)
    return BaseReport(UNET_FOLDER, folder, blend, count)


def apply_diffusers_folder(components: Components, folder: Path, blend: float = 1.0,
                           trust_pickle: bool = False) -> BaseReport:
    from transformers import CLIPTextConfig, CLIPTokenizer

    folder = Path(folder)
    # Read everything before changing anything, so a broken part leaves the components intact.
    unet_state = read_unet_folder(folder / "unet", trust_pickle)
    vae = text_encoder = tokenizer = None
    if (folder / "vae").is_dir():
        vae = build_vae(read_part(folder / "vae", "diffusion_pytorch_model", trust_pickle),
                        _read_json(folder / "vae" / "config.json"), folder / "vae", _dtype(components.vae))
    if (folder / "text_encoder").is_dir():
        try:
            config = CLIPTextConfig.from_pretrained(str(folder / "text_encoder"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read {folder / 'text_encoder'}: {exc}") from None
        text_encoder = build_text_encoder(read_part(folder / "text_encoder", "model", trust_pickle), config,
                                          folder / "text_encoder", _dtype(components.text_encoder))
    if (folder / "tokenizer").is_dir():
        try:
            tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read {folder / 'tokenizer'}: {exc}") from None
    count = blend_unet(components.unet, unet_state, blend, folder / "unet")
    replaced = []
    for name, part in (("vae", vae), ("text_encoder", text_encoder), ("tokenizer", tokenizer)):
        if part is not None:
            setattr(components, name, part)
            replaced.append(name)
    return BaseReport(DIFFUSERS_FOLDER, folder, blend, count, tuple(replaced))


APPLY = {SINGLE_FILE: apply_single_file, UNET_FOLDER: apply_unet_folder,
         DIFFUSERS_FOLDER: apply_diffusers_folder}


def apply_base(components: Components, path: Path, blend: float = 1.0,
               trust_pickle: bool = False) -> BaseReport:
    """Put a personalized SD 1.5 base under the loaded PASD model, in place.

    `blend` weighs the base's stock UNet tensors against the current ones (1: replace, 0: keep);
    PACA tensors never change. The base's VAE, text encoder (and, for folders, tokenizer)
    replace the current ones when it has them.
    """
    return APPLY[base_kind(Path(path))](components, Path(path), blend, trust_pickle)
