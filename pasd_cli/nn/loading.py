"""Build PASD networks from a released checkpoint folder and load its weights strictly.

`config.json` does not say which variant a checkpoint is, so the variant is read from the
state-dict keys (spec section 2). Models are built on the meta device and the weights assigned,
which skips random initialisation (seconds at SD size) and any copy of the weights; each tensor is
cast to the compute dtype as it is read (tensor_file), so no copy in another dtype exists either.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelError
from .controlnet import PASDControlNet
from .converted_weights import ConvertedWeights, Merges
from .keys import read_keys
from .tensor_file import float_dtypes, read_tensors
from .unet import FULL, LIGHT, PASDUNet

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_LIGHT_MARKERS = ("attn2_plus", "norm2_plus", "proj_in_plus")
_RRDB_KEY = re.compile(r"^controlnet_cond_embedding\.preprocesser\.(\d+)\.")
# Keys of released configs that describe the released classes, not diffusers'.
_PASD_CONFIG_KEYS = ("return_rgbs", "use_rrdb")
_SHOW_KEYS = 5


def detect_unet_variant(keys) -> str:
    keys = list(keys)
    full = any(".pixel_attentions." in k for k in keys)
    light = any(marker in k for k in keys for marker in _LIGHT_MARKERS)
    if full and light:
        raise ModelError("UNet weights hold both full and light PACA layers; not a released PASD UNet")
    if full:
        return FULL
    if light:
        return LIGHT
    raise ModelError("UNet weights hold no PACA layers: this is a stock Stable Diffusion UNet, not a PASD checkpoint")


def detect_rrdb_blocks(keys) -> int:
    indices = {int(m.group(1)) for k in keys if (m := _RRDB_KEY.match(k))}
    return len(indices)


def read_json_config(path: Path, what: str = "config") -> dict:
    """A model's JSON file (`what` it should hold), or a ModelError that names the file."""
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"missing {path}") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path} does not hold a {what}")
    return config


def read_config(folder: Path) -> dict:
    config = read_json_config(folder / "config.json")
    for key in _PASD_CONFIG_KEYS:
        config.pop(key, None)
    return config


def weights_path(folder: Path) -> Path:
    path = folder / WEIGHTS_NAME
    if path.is_file():
        return path
    pickles = sorted(p.name for p in folder.glob("*.bin")) if folder.is_dir() else []
    if pickles:
        raise ModelError(
            f"{folder} holds only pickled weights ({pickles[0]}); PASD loads safetensors only",
            hint="convert the file to .safetensors",
        )
    raise ModelError(f"missing {path}")


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Fail with the first offending keys when the file does not match the architecture."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mis_shaped = [
        f"{k} {tuple(state[k].shape)} != {expected[k]}"
        for k in expected
        if k in state and tuple(state[k].shape) != expected[k]
    ]
    problems = [
        (name, items)
        for name, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped))
        if items
    ]
    if problems:
        text = "; ".join(
            f"{len(items)} {name}: {', '.join(items[:_SHOW_KEYS])}" + (", ..." if len(items) > _SHOW_KEYS else "")
            for name, items in problems
        )
        raise ModelError(f"{source} does not match {type(model).__name__}: {text}")


def _load(
    model: nn.Module,
    path: Path,
    dtype: torch.dtype | None,
    keep: frozenset,
    mapped: bool,
    converted: ConvertedWeights | None = None,
    merged: Merges = (),
) -> nn.Module:
    """`converted`: where weights cast into `dtype` are kept converted, to be read (mapped, with
    `mapped`) instead of converted again, or written after converting. `merged`: files the
    caller merges into these weights next; where `converted` holds a copy with them already
    merged, that is read instead, and the model's `applied_merges` says so (else it is empty)."""
    model.applied_merges = ()
    try:
        state = None
        if converted is not None and dtype is not None and merged:
            state = converted.read(path, dtype, True, merged)  # no merge follows: mapped
            model.applied_merges = tuple(merged) if state is not None else ()
        cache = converted if state is None and dtype is not None and _converts(path, dtype, keep) else None
        if cache is not None and dtype is not None:
            state = cache.read(path, dtype, mapped)
        fresh = state is None
        if state is None:
            state = read_tensors(path, dtype, keep, mapped)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from None
    check_state_dict(model, state, path)
    if fresh and cache is not None and dtype is not None:
        cache.write(path, dtype, state)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _converts(path: Path, dtype: torch.dtype, keep: frozenset) -> bool:
    """Whether reading the file into `dtype` casts some of its tensors."""
    return bool(float_dtypes(path) - keep - {dtype})


def build_pasd_unet(config: dict, variant: str) -> PASDUNet:
    unet = PASDUNet.from_config(config)
    unet.add_pixel_attention(variant)
    return unet


def build_pasd_controlnet(config: dict, rrdb_blocks: int) -> PASDControlNet:
    controlnet = PASDControlNet.from_config(config)
    controlnet.use_degradation_removal(rrdb_blocks)
    return controlnet


def _load_folder(
    folder: Path,
    detect,
    build,
    dtype: torch.dtype | None,
    keep: frozenset,
    mapped: bool,
    converted: ConvertedWeights | None = None,
    merged: Merges = (),
):
    """Detect the variant from the file's keys, build on the meta device, assign the weights:
    floating-point ones in `dtype`, but those stored in a dtype of `keep` as stored (`mapped`:
    the file's pages, see read_tensors; `converted` and `merged`: see _load)."""
    path = weights_path(folder)
    variant = detect(read_keys(path))
    config = read_config(folder)
    with torch.device("meta"):
        model = build(config, variant)
    return _load(model, path, dtype, keep, mapped, converted, merged)


def load_pasd_unet(
    folder: Path,
    dtype: torch.dtype | None = None,
    keep: frozenset = frozenset(),
    mapped: bool = False,
    converted: ConvertedWeights | None = None,
    merged: Merges = (),
) -> PASDUNet:
    return _load_folder(folder, detect_unet_variant, build_pasd_unet, dtype, keep, mapped, converted, merged)


def load_pasd_controlnet(
    folder: Path,
    dtype: torch.dtype | None = None,
    keep: frozenset = frozenset(),
    mapped: bool = False,
    converted: ConvertedWeights | None = None,
) -> PASDControlNet:
    return _load_folder(folder, detect_rrdb_blocks, build_pasd_controlnet, dtype, keep, mapped, converted)
