"""Personalized Stable Diffusion 1.5 bases on a loaded PASD model (spec section 6).

The PASD UNet file holds the whole stock SD UNet plus the trained PACA layers. A personalized
base (a civitai/LDM single file, a DreamBooth UNet folder, a diffusers folder) replaces, or blends
into, the stock UNet tensors only: the PACA tensors always stay PASD's (the released code loses
them for folder bases). The base's VAE and text encoder replace the default ones when it has
them. Everything is changed in place on a `Components`.

Single files are converted offline in `single_file.py`, with the configs of the loaded parts;
`formats.py` tells the kinds apart without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelError
from ..nn.loading import check_state_dict, read_json_config
from .formats import DIFFUSERS_FOLDER, SINGLE_FILE, UNET_FOLDER, base_kind, weight_files  # noqa: F401
from .loading import Components
from .single_file import build_text_encoder, build_vae, read_single_file
from .weights import read_state_dict


@dataclass(frozen=True)
class BaseReport:
    kind: str
    source: Path
    blend: float
    unet_tensors: int
    replaced: tuple[str, ...] = field(default=())


# --- the stock UNet tensors ------------------------------------------------------------------


def stock_unet(unet) -> torch.nn.Module:
    """A stock diffusers UNet of the same config, on the meta device: its keys and shapes are the
    PASD UNet's minus PACA, found from the architecture rather than from key names."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(dict(unet.config))


def stock_unet_keys(unet) -> list[str]:
    return list(stock_unet(unet).state_dict())


def blend_unet(
    unet, new_state: dict[str, torch.Tensor], alpha: float, source: Path, dtype: torch.dtype | None = None
) -> int:
    """current <- alpha * new + (1 - alpha) * current for every stock tensor; PACA untouched.
    `dtype`: the blended tensors become this dtype first (half weights kept for float32 compute
    are blended in float32, as float32 weights would be). Returns how many tensors were blended."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError("blend must be in [0, 1]")
    reference = stock_unet(unet)
    new_state = {k: v for k, v in new_state.items() if v is not None}
    check_state_dict(reference, new_state, source)
    current = unet.state_dict()
    with torch.no_grad():
        for key in reference.state_dict():
            target = current[key]
            if dtype is not None and target.dtype != dtype:
                target = target.to(dtype)
                unet.get_parameter(key).data = target
            # lerp is exact at both ends: weight 0 keeps `target`, weight 1 gives `new`.
            target.lerp_(new_state[key].to(target.device, target.dtype), alpha)
    return len(new_state)


def _dtype(module) -> torch.dtype:
    return next(module.parameters()).dtype


def _part_dtype(components: Components, module) -> torch.dtype:
    """The dtype a base's part replacing `module` is built in, or a blend is computed in: the
    module's own, or float32 where half weights are kept for float32 compute (the pipeline keeps
    only what the files store in half)."""
    return torch.float32 if components.keeps_half_weights else _dtype(module)


def _blend_dtype(components: Components) -> torch.dtype | None:
    return torch.float32 if components.keeps_half_weights else None


def apply_single_file(components: Components, path: Path, blend: float = 1.0, trust_pickle: bool = False) -> BaseReport:
    parts = read_single_file(
        path,
        components.unet.config,
        components.vae.config,
        components.text_encoder.config,
        trust_pickle,
        _part_dtype(components, components.vae),
    )
    count = blend_unet(components.unet, parts.unet, blend, Path(path), _blend_dtype(components))
    replaced = []
    if parts.vae is not None:
        components.vae = parts.vae
        replaced.append("vae")
    if parts.text_encoder is not None:
        components.text_encoder = parts.text_encoder.to(_part_dtype(components, components.text_encoder))
        replaced.append("text_encoder")
    return BaseReport(SINGLE_FILE, Path(path), blend, count, tuple(replaced))


# --- folders -----------------------------------------------------------------------------------


def read_part(folder: Path, stem: str, trust_pickle: bool) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder, stem):
        state.update(read_state_dict(path, trust_pickle))
    return state


def read_unet_folder(folder: Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    config = read_json_config(folder / "config.json")
    kind = config.get("_class_name", "UNet2DConditionModel")
    if kind != "UNet2DConditionModel":
        raise ModelError(f"{folder} holds a {kind}, not a Stable Diffusion UNet")
    return read_part(folder, "diffusion_pytorch_model", trust_pickle)


def apply_unet_folder(
    components: Components, folder: Path, blend: float = 1.0, trust_pickle: bool = False
) -> BaseReport:
    folder = Path(folder)
    count = blend_unet(components.unet, read_unet_folder(folder, trust_pickle), blend, folder, _blend_dtype(components))
    return BaseReport(UNET_FOLDER, folder, blend, count)


def apply_diffusers_folder(
    components: Components, folder: Path, blend: float = 1.0, trust_pickle: bool = False
) -> BaseReport:
    from transformers import CLIPTextConfig, CLIPTokenizer

    folder = Path(folder)
    # Read everything before changing anything, so a broken part leaves the components intact.
    unet_state = read_unet_folder(folder / "unet", trust_pickle)
    vae = text_encoder = tokenizer = None
    if (folder / "vae").is_dir():
        vae = build_vae(
            read_part(folder / "vae", "diffusion_pytorch_model", trust_pickle),
            read_json_config(folder / "vae" / "config.json"),
            folder / "vae",
            _part_dtype(components, components.vae),
        )
    if (folder / "text_encoder").is_dir():
        try:
            config = CLIPTextConfig.from_pretrained(str(folder / "text_encoder"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read {folder / 'text_encoder'}: {exc}") from None
        text_encoder = build_text_encoder(
            read_part(folder / "text_encoder", "model", trust_pickle),
            config,
            folder / "text_encoder",
            _part_dtype(components, components.text_encoder),
        )
    if (folder / "tokenizer").is_dir():
        try:
            tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read {folder / 'tokenizer'}: {exc}") from None
    count = blend_unet(components.unet, unet_state, blend, folder / "unet", _blend_dtype(components))
    replaced = []
    for name, part in (("vae", vae), ("text_encoder", text_encoder), ("tokenizer", tokenizer)):
        if part is not None:
            setattr(components, name, part)
            replaced.append(name)
    return BaseReport(DIFFUSERS_FOLDER, folder, blend, count, tuple(replaced))


APPLY = {SINGLE_FILE: apply_single_file, UNET_FOLDER: apply_unet_folder, DIFFUSERS_FOLDER: apply_diffusers_folder}


def apply_base(components: Components, path: Path, blend: float = 1.0, trust_pickle: bool = False) -> BaseReport:
    """Put a personalized SD 1.5 base under the loaded PASD model, in place.

    `blend` weighs the base's stock UNet tensors against the current ones (1: replace, 0: keep);
    PACA tensors never change. The base's VAE, text encoder (and, for folders, tokenizer)
    replace the current ones when it has them.
    """
    return APPLY[base_kind(Path(path))](components, Path(path), blend, trust_pickle)
