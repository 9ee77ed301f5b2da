"""Load every part the pipeline needs from a PASD checkpoint folder and an SD 1.5 base folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelError
from ..nn.controlnet import PASDControlNet
from ..nn.converted_weights import ConvertedWeights, Merges
from ..nn.loading import load_pasd_controlnet, load_pasd_unet, read_json_config, weights_path
from ..nn.tensor_file import float_dtypes
from ..nn.unet import PASDUNet
from .half_weights import HALF_DTYPES
from .pretrained import from_pretrained

BASE_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class Components:
    unet: PASDUNet
    controlnet: PASDControlNet
    vae: object
    text_encoder: object
    tokenizer: object
    scheduler_config: dict
    # None: the released UniPC. Fast mode sets the LCM scheduler (engine/schedulers.py).
    scheduler_class: type | None = None
    # Weights stored in half precision were read as stored, to be widened per layer as they run
    # (half_weights.py); merges into them must then be kept in float32.
    keeps_half_weights: bool = False
    # Files whose merge the UNet's weights already hold: read from a converted copy made after
    # an earlier load merged them (nn/converted_weights.py), so the merge is not repeated.
    unet_merged: tuple = ()
    # The VAE runs in bfloat16 too where the networks do (`vae_dtype`), rather than upcast.
    bf16_vae: bool = False


def _require_dir(folder: Path, what: str, parts: tuple[str, ...]) -> None:
    if not folder.is_dir():
        raise ModelError(f"{what} folder not found: {folder}")
    missing = [p for p in parts if not (folder / p).is_dir()]
    if missing:
        raise ModelError(f"{what} folder {folder} lacks {', '.join(p + '/' for p in missing)}")


def load_base_parts(
    base_dir: Path, dtype: torch.dtype = torch.float32, keep: frozenset = frozenset(), bf16_vae: bool = False
) -> tuple[object, object, object, dict]:
    """(vae, text_encoder, tokenizer, scheduler_config) from a diffusers SD 1.5 folder; the text
    encoder in `dtype`, the VAE in the dtype it runs in beside networks in `dtype` (`vae_dtype`);
    either in the dtype its file stores, where that is one dtype of `keep`."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    _require_dir(base_dir, "base model", BASE_PARTS)
    vae_config = from_pretrained_config(AutoencoderKL, base_dir / "vae")
    runs_in = vae_dtype(dtype, vae_config.get("force_upcast", True), bf16_vae)
    # Straight into the dtype they run in: the libraries cast each tensor as they assign it.
    vae = from_pretrained(
        AutoencoderKL,
        base_dir / "vae",
        use_safetensors=True,
        torch_dtype=stored_dtype(base_dir / "vae", keep) or runs_in,
    )
    text_encoder = from_pretrained(
        CLIPTextModel,
        base_dir / "text_encoder",
        use_safetensors=True,
        dtype=stored_dtype(base_dir / "text_encoder", keep) or dtype,
    )
    tokenizer = from_pretrained(CLIPTokenizer, base_dir / "tokenizer")
    scheduler_config = read_json_config(base_dir / "scheduler" / "scheduler_config.json", "scheduler config")
    return vae, text_encoder, tokenizer, scheduler_config


def load_components(
    pasd_dir: Path,
    base_dir: Path,
    dtype: torch.dtype = torch.float32,
    keep_half_weights: bool = False,
    merges: bool = False,
    converted: ConvertedWeights | str | Path | None = None,
    unet_merges: Merges = (),
    bf16_vae: bool = False,
) -> Components:
    """Everything on the CPU, the networks in `dtype` (the VAE as `model_dtypes` says), each
    weight cast as it is read: no copy of the model in the files' or any other dtype is made.
    `keep_half_weights` (with a float32 `dtype`): weights that the files store in float16 or
    bfloat16 stay so, for `PASDPipeline` to widen per layer (half_weights.py); without `merges`
    (no LoRA or base to be merged into them) they are the files' pages, mapped, not read. Merges
    go into the UNet and the base parts only, so the ControlNet's weights are mapped either way.
    `converted`: where the UNet's and ControlNet's weights, cast into a half `dtype`, are
    kept converted after the first load, for later loads to map (a folder, or ConvertedWeights:
    nn/converted_weights.py); `unet_merges`: files about to be merged into the UNet, whose merged
    copy `converted` may hold (`Components.unet_merged`). `bf16_vae`: the VAE in bfloat16 beside
    bfloat16 networks (`vae_dtype`). `PASDPipeline` moves it to the chosen device."""
    _require_dir(pasd_dir, "PASD checkpoint", ("unet", "controlnet"))
    keep = HALF_DTYPES if keep_half_weights and dtype not in HALF_DTYPES else frozenset()
    # Only for half dtypes: float32 keeps half weights to widen instead (or, --exact, converts as
    # the released code does), and a float32 copy would be twice the files.
    copies = converted_weights(converted) if dtype in HALF_DTYPES else None
    unet = load_pasd_unet(pasd_dir / "unet", dtype, keep, not merges, copies, unet_merges)
    controlnet = load_pasd_controlnet(pasd_dir / "controlnet", dtype, keep, True, copies)
    vae, text_encoder, tokenizer, scheduler_config = load_base_parts(base_dir, dtype, keep, bf16_vae)
    for model in (vae, text_encoder):
        model.eval().requires_grad_(False)
    return Components(
        unet,
        controlnet,
        vae,
        text_encoder,
        tokenizer,
        scheduler_config,
        keeps_half_weights=bool(keep),
        unet_merged=unet.applied_merges,
        bf16_vae=bf16_vae,
    )


def keep_merged_unet(
    components: Components, pasd_dir: Path, converted: ConvertedWeights | None, merges: Merges
) -> None:
    """After `merges` went into a UNet converted to a half dtype: its weights, kept as a copy
    that later loads read instead of converting and merging again."""
    dtype = components.unet.dtype
    if converted is None or dtype not in HALF_DTYPES or components.unet_merged or components.keeps_half_weights:
        return
    converted.write(weights_path(pasd_dir / "unet"), dtype, components.unet.state_dict(), merges)


def converted_weights(where: ConvertedWeights | str | Path | None) -> ConvertedWeights | None:
    """A folder as ConvertedWeights that write as loads go; ConvertedWeights as they are."""
    if where is None or isinstance(where, ConvertedWeights):
        return where
    return ConvertedWeights(Path(where))


def stored_dtype(folder: Path, keep: frozenset) -> torch.dtype | None:
    """The one dtype of `keep` that the folder's only safetensors file stores all its floating-point
    tensors in; else None."""
    files = sorted(folder.glob("*.safetensors")) if keep and folder.is_dir() else []
    if len(files) != 1:
        return None
    try:
        found = float_dtypes(files[0])
    except (OSError, ValueError):
        return None  # the library's own loading reports a damaged file
    return found.pop() if len(found) == 1 and found <= keep else None


def vae_dtype(dtype: torch.dtype, force_upcast: bool, bf16_vae: bool = False) -> torch.dtype:
    """The VAE's dtype beside networks in `dtype`. The SD VAE overflows in float16, so it runs in
    float32 then, as diffusers pipelines do for VAEs flagged `force_upcast`. In bfloat16 it does
    not overflow but loses detail: its 8-bit mantissa moves decoded pixels by several levels
    (tests/test_vae_dtype.py measures it), so it is upcast too, unless `bf16_vae` trades that
    detail for speed (the fast modes: half the VAE's time on a CPU with bfloat16 instructions)."""
    if dtype == torch.bfloat16 and bf16_vae:
        return dtype
    if dtype in (torch.float16, torch.bfloat16) and force_upcast:
        return torch.float32
    return dtype


def model_dtypes(dtype: torch.dtype, vae, bf16_vae: bool = False) -> tuple[torch.dtype, torch.dtype]:
    """(networks dtype, VAE dtype)."""
    return dtype, vae_dtype(dtype, getattr(vae.config, "force_upcast", False), bf16_vae)


def from_pretrained_config(loader, folder: Path) -> dict:
    try:
        return dict(loader.load_config(str(folder)))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load {folder}: {exc}") from None
