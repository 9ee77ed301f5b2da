"""Merge Stable Diffusion 1.5 LoRAs into the loaded PASD model (spec section 6).

W += multiplier * (alpha / rank) * up @ down, per layer, for linear and conv (1x1 and kxk) layers;
a layer without an alpha gets alpha = rank (scale 1), the kohya and PEFT convention. The released
code forgets alpha / rank. Key names go through diffusers' own converters (kohya, including
kohya files with the original LDM block names, old diffusers and PEFT layouts); the merge is ours,
and it touches stock UNet and text-encoder layers only, never PACA.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelError, first_line
from .bases import stock_unet_keys
from .loading import Components
from .single_file import TEXT_MODEL_PREFIX
from .weights import read_state_dict

_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_")
_SDXL_PREFIXES = ("lora_te2_", "text_encoder_2.")
_UNSUPPORTED = {
    "dora_scale": "DoRA",
    "hada_": "LoHa",
    "lokr_": "LoKr",
    "lora_mid": "LoCon with a mid (CP) layer",
    ".diff_b": "full-weight difference",
    ".diff": "full-weight difference",
}
_SHOW = 5


@dataclass(frozen=True)
class LoraLayer:
    down: torch.Tensor  # (rank, in, ...) : lora_down / lora_A
    up: torch.Tensor  # (out, rank, ...): lora_up / lora_B
    scale: float  # alpha / rank

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, shape: torch.Size) -> torch.Tensor:
        """up @ down in float32, shaped like the weight it adds to (the kxk kernel rides on down)."""
        return (self.up.flatten(1).float() @ self.down.flatten(1).float()).reshape(shape)


@dataclass(frozen=True)
class LoraReport:
    source: Path
    weight: float
    unet_layers: int
    text_encoder_layers: int


@dataclass
class LoraFile:
    unet: dict[str, LoraLayer]
    text_encoder: dict[str, LoraLayer]


def _refuse_unsupported(state: dict[str, torch.Tensor], source: Path) -> None:
    if not any("lora" in k for k in state) and any(
        k.startswith(("model.diffusion_model.", "down_blocks.", "conv_in.")) for k in state
    ):
        raise ModelError(f"{source} is a full model, not a LoRA", hint="pass it as the style base", field="style")
    for marker, name in _UNSUPPORTED.items():
        if any(marker in k and (not marker.startswith(".") or k.endswith(marker)) for k in state):
            raise ModelError(f"{source} is a {name} network; only plain LoRA (up/down) is supported")
    if any(k.startswith(_SDXL_PREFIXES) for k in state):
        raise ModelError(f"{source} is an SDXL LoRA (it has a second text encoder); PASD uses SD 1.5")


def _bake_kohya_alphas(state: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """Fold each layer's alpha / rank into its up weight, so the converted names need no alphas."""
    baked = {}
    for key, value in state.items():
        if key.endswith(".alpha"):
            continue
        if key.endswith(".lora_up.weight"):
            name = key.removesuffix(".lora_up.weight")
            down = state.get(f"{name}.lora_down.weight")
            if down is None:
                raise ModelError(f"{source}: {name} has an up weight but no down weight")
            alpha = state.get(f"{name}.alpha")
            if alpha is not None:
                value = value.float() * (float(alpha) / down.shape[0])
        baked[key] = value
    return baked


def _to_peft_names(state: dict[str, torch.Tensor], unet_config, source: Path) -> dict[str, torch.Tensor]:
    """Any supported layout -> `unet.<module>.lora_A.weight` / `text_encoder.<module>.lora_B.weight`."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_unet_state_dict_to_peft
    from diffusers.utils.state_dict_utils import StateDictType, convert_state_dict_to_peft

    if state and all(k.startswith(_KOHYA_PREFIXES) for k in state):
        state = _bake_kohya_alphas(state, source)
    try:
        converted, _ = StableDiffusionLoraLoaderMixin.lora_state_dict(dict(state), unet_config=unet_config)
        unet = {k.removeprefix("unet."): v for k, v in converted.items() if k.startswith("unet.")}
        text = {k.removeprefix("text_encoder."): v for k, v in converted.items() if k.startswith("text_encoder.")}
        other = [k for k in converted if not k.startswith(("unet.", "text_encoder."))]
        unet = convert_unet_state_dict_to_peft(unet)
        text = convert_state_dict_to_peft(text, original_type=StateDictType.DIFFUSERS_OLD)
    except (ValueError, KeyError, IndexError) as exc:
        raise ModelError(f"{source} is not a Stable Diffusion 1.5 LoRA: {first_line(exc)}") from None
    if other:
        raise ModelError(f"{source} is not a Stable Diffusion 1.5 LoRA: unknown keys such as {other[0]}")
    return {**{f"unet.{k}": v for k, v in unet.items()}, **{f"text_encoder.{k}": v for k, v in text.items()}}


def _layers(state: dict[str, torch.Tensor], prefix: str, source: Path) -> dict[str, LoraLayer]:
    names = {k.removeprefix(prefix).rsplit(".lora_", 1)[0] for k in state if k.startswith(prefix) and ".lora_" in k}
    layers = {}
    for name in sorted(names):
        down = state.get(f"{prefix}{name}.lora_A.weight")
        up = state.get(f"{prefix}{name}.lora_B.weight")
        if down is None or up is None:
            raise ModelError(f"{source}: layer {name} lacks its {'down' if down is None else 'up'} weight")
        alpha = state.get(f"{prefix}{name}.alpha")
        scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
        layers[name] = LoraLayer(down, up, scale)
    return layers


def read_lora(path: Path, unet_config, trust_pickle: bool = False) -> LoraFile:
    path = Path(path)
    state = read_state_dict(path, trust_pickle)
    _refuse_unsupported(state, path)
    peft = _to_peft_names(state, unet_config, path)
    if not peft:
        raise ModelError(f"{path} holds no LoRA layers")
    return LoraFile(_layers(peft, "unet.", path), _layers(peft, "text_encoder.", path))


def _text_encoder_module(model, name: str):
    # Kohya names the text encoder's layers with the `text_model.` wrapper that
    # transformers >= 5.6 no longer has.
    for candidate in (name, name.removeprefix(TEXT_MODEL_PREFIX), TEXT_MODEL_PREFIX + name):
        try:
            return model.get_submodule(candidate)
        except AttributeError:
            continue
    return None


def _targets(layers: dict[str, LoraLayer], find, source: Path, what: str) -> list[tuple[torch.nn.Module, LoraLayer]]:
    pairs, unknown = [], []
    for name, layer in layers.items():
        module = find(name)
        weight = getattr(module, "weight", None)
        if (
            weight is None
            or weight.shape[0] != layer.up.shape[0]
            or weight[0].numel() != layer.down[0].numel()
            or layer.up.flatten(1).shape[1] != layer.rank
        ):
            unknown.append(name)
        else:
            pairs.append((module, layer))
    if unknown:
        shown = ", ".join(unknown[:_SHOW]) + (", ..." if len(unknown) > _SHOW else "")
        raise ModelError(
            f"{source}: {len(unknown)} LoRA layer(s) match no {what} layer of that shape (diffusers names): {shown}"
        )
    return pairs


# Elements per slice of a merge's sum: a half-precision weight is widened a slice at a time, in
# memory the allocator reuses (under the command line's 4 MB mmap threshold, cli/runtime.py).
MERGE_SLICE = 1 << 19


def _add_scaled_in_place(delta: torch.Tensor, scale: float, weight: torch.Tensor) -> None:
    """delta <- scale * delta + weight, in delta: the merge's only new tensor. An SD-size
    LCM-LoRA touches 610M weights; with a temporary per operand (the scaled product, the widened
    weight, the sum: 7 GB of fresh pages) its merge took longer than the model's load. The same
    float32 operations, so the same bits."""
    delta.mul_(scale)
    flat, source = delta.view(-1), weight.reshape(-1)
    for start in range(0, flat.numel(), MERGE_SLICE):
        flat[start : start + MERGE_SLICE].add_(source[start : start + MERGE_SLICE])


def apply_lora(
    components: Components, path: Path, weight: float = 1.0, trust_pickle: bool = False, unet: bool = True
) -> LoraReport:
    """Merge one LoRA file into the stock UNet (not with `unet` false: its weights hold the merge
    already) and text encoder layers, in place."""
    path = Path(path)
    if not torch.isfinite(torch.tensor(weight)):
        raise ValueError("LoRA weight must be finite")
    lora = read_lora(path, components.unet.config, trust_pickle)
    model, text_encoder = components.unet, components.text_encoder
    stock = set(stock_unet_keys(model))

    def find_unet(name):
        return model.get_submodule(name) if f"{name}.weight" in stock else None

    pairs = (_targets(lora.unet, find_unet, path, "stock UNet") if unet else []) + _targets(
        lora.text_encoder, lambda n: _text_encoder_module(text_encoder, n), path, "text encoder"
    )
    with torch.no_grad():
        for module, layer in pairs:
            # Summed in float32 and rounded once: weights loaded in half precision lose no more
            # than their own rounding (a float32 weight takes the very same sum as before).
            merged = layer.delta(module.weight.shape).to(module.weight.device)
            _add_scaled_in_place(merged, weight * layer.scale, module.weight)
            if components.keeps_half_weights:
                # Half only to be widened for float32 compute: the merge stays float32, as the
                # float32 weights' would.
                module.weight.data = merged
            else:
                module.weight.copy_(merged)
    return LoraReport(path, weight, len(lora.unet), len(lora.text_encoder))
