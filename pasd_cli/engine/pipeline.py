"""The Real-ISR pipeline as the released script runs it, one numbered step per stage (spec
section 4). The engine takes plain values: a PIL image, settings, a device and a dtype."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import ModelError
from ..nn.blockwise_attention import BlockwiseAttention
from .color import COLOR_FIXES
from .denoise import Guidance, NoisePredictor
from .half_weights import Scratch, widen_per_layer
from .limits import attention_heads, device_limits, latent_tile_cap
from .loading import Components, load_components, model_dtypes
from .memory import TileShrinker, Warn
from .noise import initial_latents, standard_normal_draws
from .precision import NonFiniteError, dtype_name, require_finite, safer_dtype
from .prompts import build_prompt, prompt_embeddings
from .resize import final_resize, make_hint
from .schedulers import PortableUniPCScheduler, schedule_sigmas
from .settings import MIN_VAE_TILE, RELEASED_LATENT_OVERLAP, UpscaleSettings
from .tile_batch import auto_tile_batch
from .tiling import TileGrid, auto_tiling, needs_tiling, shrunk_overlap
from .vae import VaeCodec, cap_vae_tile, choose_vae_tile, untiled, vae_peak_bytes
from .vae_attention import auto_attention_window

# progress(stage, done, total): stage is "step", "tile" (latent tiles of a step), "encode" or
# "decode" (VAE tile passes).
Progress = Callable[[str, int, int], None]
# Smallest latent tile an out-of-memory retry goes down to.
MIN_LATENT_TILE = 16
# trace(name, value): sees each intermediate named as in the reference bundle, for debugging
# and parity tests.
Trace = Callable[[str, object], None]


def _no_trace(name: str, value: object) -> None:
    pass


@dataclass
class UpscaleResult:
    image: Image.Image
    prompt: str
    hint_size: tuple[int, int]
    latent_tiles: int = 1  # tiles per denoising step (1: untiled)
    tile_batch: int = 1  # latent tiles per denoiser pass
    vae_tile: int = 0  # VAE tile side in pixels (0: untiled)
    dtype: torch.dtype | None = None  # the networks' dtype that made it (safer than asked after an overflow)
    vae_attention_window: int = 0  # the VAE attention's window (0: exact global attention)


@dataclass
class Generated:
    """What the shared denoising path makes of a ready hint image."""

    image: torch.Tensor  # uint8 (3, H, W) at the hint's size, before any colour fix
    latent_tiles: int = 1
    vae_tile: int = 0
    dtype: torch.dtype | None = None  # the networks' dtype that made it (safer than asked after an overflow)
    vae_attention_window: int = 0
    tile_batch: int = 1


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> uint8 (3, H, W), contiguous. The pixels come interleaved (H, W, 3); a permuted
    view of them would be channels-last in memory, and every elementwise op and the first
    convolutions on the device would inherit that layout by accident, unlike the networks' own."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(image.convert("RGB")).transpose(2, 0, 1)))


def tensor_to_image(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).cpu().numpy())


def decoded_to_uint8(decoded: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """Raw decoder output (1, 3, H, W) -> uint8 (3, H, W): diffusers' postprocess, rounding.
    In strips of rows, so no float temporary is the size of the image."""
    out = torch.empty(decoded.shape[1:], dtype=torch.uint8, device=decoded.device)
    for start in range(0, decoded.shape[-2], rows):
        strip = decoded[0, :, start : start + rows]
        out[:, start : start + rows] = ((strip / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return out


class PASDPipeline:
    """`memory_budget`: bytes the VAE may use on the device, measured by the caller; with it,
    `settings.vae_tile = None` picks VAE tiling by image size (exact either way). Without it,
    the automatic choice is untiled.

    `compute_scope`: a context each denoising loop and each untiled VAE encode runs in, set by
    the caller. Each allocates and frees the same large tensors over and over (a step's, a
    strip's), so a host may, for instance, have its allocator keep freed memory for the next ones
    (the command line does: cli/runtime.py). Tiled VAE passes run outside it: their tiles'
    tensors, of many sizes beside whole-image ones that live on, would fragment memory kept that
    way. The decode runs outside it too, since its peak is a run's: measured on the CPU at SD
    size, inside it the decode took 0.8-1 s less but peaked 0.13 GB higher."""

    compute_scope: Callable[[], AbstractContextManager[object]] = nullcontext
    _compiled = False  # optimize(compile=True) was called

    def __init__(
        self, components: Components, device: torch.device, dtype: torch.dtype, memory_budget: int | None = None
    ):
        self.memory_budget = memory_budget
        self.device, self.dtype = torch.device(device), dtype
        self.limits = device_limits(self.device)
        self.bf16_vae = components.bf16_vae
        net_dtype, vae_dtype = model_dtypes(dtype, components.vae, self.bf16_vae)
        self._scratch = Scratch(dtype, self.device)  # the networks run one at a time
        self.half_layers = 0  # layers that keep half weights (none where the files store float32)
        keep = components.keeps_half_weights
        self.unet = self._place(components.unet, net_dtype, keep)
        self.controlnet = self._place(components.controlnet, net_dtype, keep)
        self.text_encoder = self._place(components.text_encoder, net_dtype, keep)
        self.tokenizer = components.tokenizer
        self.vae = VaeCodec(self._place(components.vae, vae_dtype, keep))
        scheduler_class = components.scheduler_class or PortableUniPCScheduler
        self._scheduler_config = scheduler_class.from_config(components.scheduler_config).config
        self._scheduler_class = scheduler_class

    def _place(self, model, dtype: torch.dtype, keep_half: bool):
        """On the device; in `dtype`, or with half weights widened to it per layer."""
        if not keep_half:
            return model.to(self.device, dtype)
        model.to(self.device)
        self.half_layers += widen_per_layer(model, dtype, self._scratch)
        return model

    @property
    def half_weights(self) -> bool:
        return self.half_layers > 0

    def optimize(self, channels_last: bool = False, compile: bool = False) -> None:
        """Speed options that keep the result up to float rounding. `channels_last`: the networks'
        convolution weights in NHWC layout, which cuDNN's fast fp16/bf16 kernels use (their inputs
        follow). `compile`: torch.compile of the UNet and ControlNet forwards, in place (the
        modules stay what they are), with static shapes: each tile shape compiles once, on
        first use."""
        if channels_last:
            with torch.inference_mode(False):
                for model in (self.unet, self.controlnet, self.vae.vae):
                    model.to(memory_format=torch.channels_last)
        if compile:
            for model in (self.unet, self.controlnet):
                model.compile(dynamic=False)
        self._compiled = self._compiled or compile

    def _encode_scope(self, tile: int, height: int, width: int) -> AbstractContextManager[object]:
        """`compute_scope` for an untiled VAE encode of height x width pixels."""
        return self.compute_scope() if untiled(tile, height, width) else nullcontext()

    def _attention(self, settings: UpscaleSettings) -> AbstractContextManager[object]:
        """Blockwise attention for bfloat16 on the CPU, outside --exact (nn/blockwise_attention.py:
        0.45x the time of torch's kernel over a 64x64 latent). Compiled networks keep torch's
        kernel, which the compiler knows."""
        if self.device.type == "cpu" and self.dtype == torch.bfloat16 and not settings.exact and not self._compiled:
            return BlockwiseAttention()
        return nullcontext()

    @classmethod
    def from_folders(
        cls, pasd_dir: Path, base_dir: Path, device: torch.device, dtype: torch.dtype, memory_budget: int | None = None
    ) -> PASDPipeline:
        return cls(load_components(Path(pasd_dir), Path(base_dir), dtype), device, dtype, memory_budget)

    def new_scheduler(self, steps: int, seed: int = 0):
        scheduler = self._scheduler_class.from_config(self._scheduler_config)
        scheduler.set_timesteps(steps, device=self.device)
        if hasattr(scheduler, "seed_step_noise"):  # schedulers that draw noise between steps (LCM)
            scheduler.seed_step_noise(seed)
        return scheduler

    def encode_prompts(self, prompt: str, negative_prompt: str, cfg: bool) -> torch.Tensor:
        return prompt_embeddings(self.tokenizer, self.text_encoder, prompt, negative_prompt, cfg)

    def vae_tile(self, settings: UpscaleSettings, height: int, width: int) -> int:
        """The VAE tile for an image of height x width pixels (0: untiled); a requested tile too
        large for the device's per-tensor limits is made smaller (the result is the same)."""
        vae = self.vae.vae
        if settings.vae_tile is None and self.memory_budget is not None:
            strips = not settings.exact and self.vae.runs_in_strips
            return choose_vae_tile(
                vae.config, height, width, vae.dtype.itemsize, self.memory_budget, self.limits, strips
            )
        tile = settings.vae_tile or 0
        return cap_vae_tile(vae.config, height, width, vae.dtype.itemsize, self.limits, tile)

    def latent_tiling(self, settings: UpscaleSettings, height: int, width: int) -> tuple[int, int]:
        """(tile, overlap) for a height x width latent: the settings' tile with the released
        overlap unless given, or the cheapest tiling (`auto_tiling`) when the tile is automatic.
        Where the device's attention must fit one buffer (MPS), the tile is made smaller: there a
        too large attention aborts the process, so no retry could catch it."""
        cap = None
        if self.limits.attention_materialised:
            batch = (2 if settings.uses_cfg else 1) * (settings.tile_batch or 1)  # automatic: 1 there
            cap = latent_tile_cap(self.limits, attention_heads(self.unet.config), batch)
        if settings.latent_tile is None:
            plan = auto_tiling(height, width, settings.latent_overlap, cap)
            return plan.tile, plan.overlap
        overlap = RELEASED_LATENT_OVERLAP if settings.latent_overlap is None else settings.latent_overlap
        tile = settings.latent_tile if cap is None else min(settings.latent_tile, cap)
        return tile, shrunk_overlap(overlap, settings.latent_tile, tile)

    def tile_batch(self, settings: UpscaleSettings, height: int, width: int, tile: int, overlap: int) -> int:
        """Latent tiles per denoiser pass for a height x width latent tiled by `tile` and
        `overlap`: the settings' own, or when automatic (None) `auto_tile_batch`'s choice within
        the memory budget."""
        if settings.tile_batch is not None:
            return settings.tile_batch
        if not needs_tiling(height, width, tile):
            return 1
        tiles = len(TileGrid.build(height, width, tile, overlap).tiles)
        copies = 2 if settings.uses_cfg else 1
        return auto_tile_batch(
            self.device.type, tiles, tile * tile, copies, self.unet.dtype.itemsize, self.memory_budget
        )

    def vae_attention_window(self, settings: UpscaleSettings, height: int, width: int) -> int:
        """The VAE attention's window for an image of height x width pixels: the settings', or
        when automatic (None) a window only on the CPU where global attention would dominate."""
        if settings.vae_attention_window is not None:
            return settings.vae_attention_window
        factor = self.vae.factor
        return auto_attention_window(self.vae.vae.config, height // factor, width // factor, self.device.type)

    def vae_checkpoint_bytes(self, tile: int, height: int, width: int) -> int:
        """What the memory budget leaves beside one tile: whole-image activations between VAE
        blocks that spare the tiled passes recomputation (0 without a budget)."""
        if not self.memory_budget or tile <= 0:
            return 0
        vae = self.vae.vae
        left = max(0, self.memory_budget - vae_peak_bytes(vae.config, height, width, vae.dtype.itemsize, tile))
        # Each stored activation is at most this, so none passes the device's per-tensor limits.
        return min(left, self.limits.max_tensor_bytes(vae.dtype.itemsize) or left)

    def initial_latents(
        self,
        hint: torch.Tensor,
        scheduler,
        settings: UpscaleSettings,
        vae_tile: int = 0,
        on_tile=None,
        checkpoint_bytes: int = 0,
    ) -> torch.Tensor:
        with self._encode_scope(vae_tile, *hint.shape[-2:]):
            mean, std = self.vae.encode_moments(
                hint, tile=vae_tile, on_tile=on_tile, checkpoint_bytes=checkpoint_bytes, strips=not settings.exact
            )
        draws = standard_normal_draws(mean.shape, torch.Generator("cpu").manual_seed(settings.seed))
        latents = initial_latents(
            mean,
            std,
            scheduler.timesteps,
            schedule_sigmas(scheduler),
            settings.added_noise_level,
            self.vae.scaling_factor,
            draws,
        )
        return latents * scheduler.init_noise_sigma

    def noise_predictor(
        self,
        prompt_embeds,
        hint,
        settings,
        progress: Progress | None = None,
        latent_tile: int | None = None,
        tile_batch: int | None = None,
    ):
        """The predictor for the latent of `hint`, tiled as `latent_tiling` plans it, or with
        `latent_tile` (a retry's smaller tile) and the planned overlap made to fit it; with
        `tile_batch` tiles a pass, or as `self.tile_batch` decides."""
        on_tile = (lambda done, total: progress("tile", done, total)) if progress else None
        height, width = hint.shape[-2] // 8, hint.shape[-1] // 8
        planned, overlap = self.latent_tiling(settings, height, width)
        tile = latent_tile or planned
        overlap = shrunk_overlap(overlap, planned, tile)
        batch = tile_batch or self.tile_batch(settings, height, width, tile, overlap)
        return NoisePredictor(
            self.unet,
            self.controlnet,
            prompt_embeds,
            hint,
            Guidance(settings.guidance, settings.conditioning_scale),
            tile,
            overlap,
            batch,
            settings.latent_blend,
            dtype=self.unet.dtype,
            on_tile=on_tile,
        )

    def denoise(
        self,
        latents: torch.Tensor,
        prompt_embeds,
        hint,
        settings: UpscaleSettings,
        latent_tile: int | None = None,
        progress: Progress | None = None,
        trace: Trace = _no_trace,
        tile_batch: int | None = None,
    ) -> torch.Tensor:
        scheduler = self.new_scheduler(settings.steps, settings.seed)  # fresh: a retry starts over
        with self.compute_scope(), self._attention(settings):
            predict = self.noise_predictor(prompt_embeds, hint, settings, progress, latent_tile, tile_batch)
            for index, t in enumerate(scheduler.timesteps):
                eps = predict(latents, t)
                latents = scheduler.step(eps, t, latents).prev_sample
                trace("noise_pred", eps)
                trace("latents_after_step", latents)
                if progress:
                    progress("step", index + 1, len(scheduler.timesteps))
            del predict  # its caches are freed inside the scope, whose end may hand memory back
        return latents

    def use_dtype(self, dtype: torch.dtype) -> None:
        """Cast the networks in place: their weights exist once, on the device. Outside inference
        mode whatever the caller's, so the weights stay ordinary tensors (later merges may change
        them in place)."""
        net_dtype, vae_dtype = model_dtypes(dtype, self.vae.vae, self.bf16_vae)
        with torch.inference_mode(False):
            for model in (self.unet, self.controlnet, self.text_encoder):
                model.to(dtype=net_dtype)
            self.vae.vae.to(dtype=vae_dtype)
        self.dtype = dtype

    def upscale(
        self,
        lr_image: Image.Image,
        settings: UpscaleSettings,
        caption: str | None = None,
        progress: Progress | None = None,
        trace: Trace = _no_trace,
        label: str | None = None,
        on_warning: Warn | None = None,
    ) -> UpscaleResult:
        """`caption` or `label`: the image's high-level information (spec section 5), as
        `build_prompt` combines it with the settings' prompts. On an out-of-memory error the
        latent or VAE tile is halved and the stage run again, with one warning through
        `on_warning`; so is an image whose results overflowed (see `generate`)."""
        # 1. The hint image: upscaled, enlarged to the process size, sides multiples of 8. It
        # stays uint8 (a third of the memory of floats); each consumer converts its crop.
        lr_image = lr_image.convert("RGB")
        hint_image = make_hint(lr_image, settings.scale, settings.process_size)
        prompt = build_prompt(
            settings.prompt, settings.added_prompt, caption=caption, label=label, separator=settings.caption_separator
        )
        generated = self.generate(hint_image, prompt, settings, progress, trace, on_warning)

        # 6. Colour fix against the hint, truncating.
        sr_uint8 = generated.image
        if settings.color_fix != "none":
            sr_uint8 = COLOR_FIXES[settings.color_fix](sr_uint8, image_to_tensor(hint_image))
            trace("color_fixed_uint8", sr_uint8)

        # 7. Back to the requested output size.
        image = final_resize(tensor_to_image(sr_uint8), lr_image.size, settings.scale)
        return UpscaleResult(
            image=image,
            prompt=prompt,
            hint_size=hint_image.size,
            latent_tiles=generated.latent_tiles,
            tile_batch=generated.tile_batch,
            vae_tile=generated.vae_tile,
            dtype=generated.dtype,
            vae_attention_window=generated.vae_attention_window,
        )

    def generate(
        self,
        hint_image: Image.Image,
        prompt: str,
        settings: UpscaleSettings,
        progress: Progress | None = None,
        trace: Trace = _no_trace,
        on_warning: Warn | None = None,
    ) -> Generated:
        """The path every mode shares, from a ready hint image (RGB, sides multiples of 8) and
        the exact positive prompt: prompts, initial latents, denoising, decoding. The settings'
        scale, process size, prompt parts and colour fix are not read here.

        Latents or a decoded image holding NaN or inf (a float16 overflow) never become an image:
        the image is run again in a safer dtype (bfloat16, then float32), with one warning. The
        networks keep that dtype for the next images, since casting them back down would not
        restore the weights' precision. Non-finite even in float32 raises ModelError."""
        tried: list[torch.dtype] = []
        while True:
            try:
                generated = self._generate(hint_image, prompt, settings, progress, trace, on_warning)
                break
            except NonFiniteError as exc:
                tried.append(self.dtype)
                failed = exc.what
            # Outside the handler, so that the failed run's tensors are freed before the cast.
            safer = safer_dtype(self.dtype, self.device)
            if safer is None:
                raise ModelError(
                    f"the model gives non-finite values (NaN or inf) in the {failed}, in "
                    + ", ".join(map(dtype_name, tried)),
                    hint="its weights overflow: a merged base or LoRA may be broken or weighted too high",
                )
            self.use_dtype(safer)
        if tried and on_warning:
            on_warning(
                f"{dtype_name(tried[0])} overflowed (non-finite {failed}); this image was made in "
                f"{dtype_name(self.dtype)}, which the networks keep for the next images"
            )
        return generated

    @torch.inference_mode()
    def _generate(
        self,
        hint_image: Image.Image,
        prompt: str,
        settings: UpscaleSettings,
        progress: Progress | None,
        trace: Trace,
        on_warning: Warn | None,
    ) -> Generated:
        hint_uint8 = image_to_tensor(hint_image)
        hint = hint_uint8.unsqueeze(0).to(self.device)
        trace("upscaled_input_uint8", hint_uint8)
        height, width = hint.shape[-2:]
        shrink = TileShrinker(self.device, on_warning)
        vae_tile = self.vae_tile(settings, height, width)
        first_vae_tile = vae_tile

        # After an out-of-memory retry, no whole-image checkpoints either.
        def checkpoints(tile):
            return self.vae_checkpoint_bytes(tile, height, width) if tile == first_vae_tile else 0

        window = self.vae_attention_window(settings, height, width)
        self.vae.set_attention_window(window)
        vae_progress = {
            stage: (lambda done, total, stage=stage: progress(stage, done, total)) if progress else None
            for stage in ("encode", "decode")
        }

        # 2. Prompts: [negative; positive] with guidance.
        prompt_embeds = self.encode_prompts(prompt, settings.negative_prompt, settings.uses_cfg)
        trace("prompt", prompt)
        trace("prompt_embeds", prompt_embeds)

        # 3. Scheduler and the adjustable-noise initial latents.
        scheduler = self.new_scheduler(settings.steps, settings.seed)
        latents, vae_tile = shrink.run(
            lambda tile: self.initial_latents(
                hint, scheduler, settings, tile, vae_progress["encode"], checkpoints(tile)
            ),
            vae_tile,
            max(height, width),
            MIN_VAE_TILE,
            "VAE",
        )
        trace("timesteps", scheduler.timesteps)
        trace("initial_latents", latents)

        # 4. Denoising loop (from the initial latents again if it runs out of memory).
        initial = latents
        planned_tile, planned_overlap = self.latent_tiling(settings, *latents.shape[-2:])
        tile_batch = [self.tile_batch(settings, *latents.shape[-2:], planned_tile, planned_overlap)]

        def one_tile_a_pass() -> str | None:
            """Out of memory with a batch of tiles: one a pass first (the same result)."""
            if tile_batch[0] == 1:
                return None
            tile_batch[0] = 1
            return "one latent tile a pass"

        latents, latent_tile = shrink.run(
            lambda tile: self.denoise(initial, prompt_embeds, hint, settings, tile, progress, trace, tile_batch[0]),
            planned_tile,
            max(latents.shape[-2:]),
            MIN_LATENT_TILE,
            "latent",
            changes_result=True,
            relieve=one_tile_a_pass,
        )
        # Decoded, NaN or inf would make a black or white image that looks like a result.
        require_finite(latents, "latents")

        # 5. Decode to uint8, rounding.
        decoded, vae_tile = shrink.run(
            lambda tile: self.vae.decode(
                latents / self.vae.scaling_factor,
                tile,
                on_tile=vae_progress["decode"],
                checkpoint_bytes=checkpoints(tile),
                strips=not settings.exact,
            ),
            vae_tile,
            max(height, width),
            MIN_VAE_TILE,
            "VAE",
        )
        require_finite(decoded, "decoded image")
        trace("decoded", decoded)
        sr_uint8 = decoded_to_uint8(decoded).cpu()
        del decoded
        trace("pipeline_output_uint8", sr_uint8)

        latent_h, latent_w = latents.shape[-2:]
        overlap = shrunk_overlap(planned_overlap, planned_tile, latent_tile)
        latent_tiles = (
            len(TileGrid.build(latent_h, latent_w, latent_tile, overlap).tiles)
            if needs_tiling(latent_h, latent_w, latent_tile)
            else 1
        )
        vae_tile = 0 if untiled(vae_tile, height, width) else vae_tile
        return Generated(sr_uint8, latent_tiles, vae_tile, self.dtype, window, min(tile_batch[0], latent_tiles))

    def colorize(
        self,
        image: Image.Image,
        settings,
        luma16: np.ndarray | None = None,
        caption: str | None = None,
        label: str | None = None,
        progress: Progress | None = None,
        trace: Trace = _no_trace,
        on_warning: Warn | None = None,
    ):
        """Colorization of a black-and-white image (spec section 7): `settings` is a
        `ColorizeSettings`; returns a `ColorizeResult`. Needs the colorization checkpoint and
        its scheduler (`load_colorizer`). See engine/colorize.py."""
        from .colorize import colorize

        return colorize(self, image, settings, luma16, caption, label, progress, trace, on_warning)
