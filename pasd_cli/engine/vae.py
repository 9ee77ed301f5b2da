"""VAE encode/decode for the pipeline: posterior moments in, raw decoder output out.

Untiled, the stock AutoencoderKL runs. Tiled (`tile` > 0, in image pixels), the encoder and the
decoder are split at their middle block, which works at latent resolution and holds a global
self-attention (not tileable exactly):

    encoder: conv_in, down blocks            -> tiled (vae_tiling.run_chain, exact)
             mid block, norm, conv_out, quant -> whole latent
    decoder: post_quant, conv_in, mid block   -> whole latent
             up blocks, norm, conv_out        -> tiled (exact)

The tiled parts are chains of stages (one per block; the decoder's cut before each upsampler),
which `checkpoint_bytes` lets run as separate sections with whole-image tensors in between.
The split mirrors diffusers' Encoder.forward / Decoder.forward; every layer is diffusers' own.
"""

from __future__ import annotations

from fractions import Fraction

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from . import vae_attention, vae_strips
from .limits import DeviceLimits, vae_elements_per_pixel
from .vae_tiling import Box, Stage, TileProgress, run_chain

# Activations of a full-resolution resnet's width alive at once, for the memory estimates below.
# Checked against the peak RSS of tiny-VAE passes on the CPU in float32: whole 1024x1024 decode
# 336 MB measured / 396 estimated; 2048x2048 in 512-px tiles 235 / 264 MB.
_LIVE_ACTIVATIONS = 6
# The same, untiled with the full-resolution layers in row strips (vae_strips): a layer's input and
# one intermediate, with room to spare. Measured for SD's VAE at 512x512 in float32: 1.9 (decode)
# and 1.3 (encode) activations of the widest full-resolution layer's, against 3.5 and 2.4 stock.
_LIVE_IN_STRIPS = 3
# The middle block at latent resolution: input, normalised, q, k, v, output.
_LIVE_MID = 6
# Candidate tiles for the automatic choice, largest first.
_AUTO_TILES = (3072, 2048, 1536, 1024, 768, 512, 384, 256)


def _to_pixels(image: torch.Tensor, box: Box | None, dtype: torch.dtype, device) -> torch.Tensor:
    """Image in [0, 1] (float) or uint8 -> VAE input in [-1, 1]; x/255*2-1 as the whole-image path."""
    if box is not None:
        top, left, height, width = box
        image = image[:, :, top : top + height, left : left + width]
    image = image.to(device)
    if image.dtype == torch.uint8:
        image = image.float() / 255.0
    return (image * 2 - 1).to(dtype)


class VaeCodec:
    """VAE passes; results come back float32."""

    def __init__(self, vae: AutoencoderKL, attention_window: int = 0):
        self.vae = vae
        self.attention_window = -1
        self.set_attention_window(attention_window)

    def set_attention_window(self, window: int) -> None:
        if window != self.attention_window:
            vae_attention.install(self.vae, window)
            self.attention_window = window

    @property
    def runs_in_strips(self) -> bool:
        """Whether `strips=True` runs both halves in row strips (stock layers throughout)."""
        return vae_strips.supports_encoder(self.vae.encoder) and vae_strips.supports_decoder(self.vae.decoder)

    @property
    def scaling_factor(self) -> float:
        return self.vae.config.scaling_factor

    @property
    def factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # -- encode --------------------------------------------------------------------------------

    def _encoder_stages(self) -> list[Stage]:
        """conv_in and the down blocks, one stage per block (cut points after downsampling)."""
        encoder = self.vae.encoder
        stages, scale = [], Fraction(1)
        for index, block in enumerate(encoder.down_blocks):
            scale /= 2 ** len(block.downsamplers or ())
            parts = ((encoder, "conv_in"),) if index == 0 else ()

            def run(x, block=block, first=index == 0):
                return block(encoder.conv_in(x) if first else x)

            stages.append(
                Stage(run, parts + ((encoder.down_blocks, str(index)),), block.resnets[-1].out_channels, scale)
            )
        return stages

    def encode_moments(
        self,
        image: torch.Tensor,
        tile: int = 0,
        exact: bool = True,
        on_tile: TileProgress | None = None,
        checkpoint_bytes: int = 0,
        strips: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`image` in [0, 1] or uint8, (1, 3, H, W) -> posterior mean and std, (1, 4, H/8, W/8).
        `tile` is the side of a tile's core in pixels; 0 or at least the image: untiled.
        `checkpoint_bytes` may hold whole-image activations between blocks (vae_tiling).
        `strips`: untiled, the down blocks run in row strips (as `decode`'s)."""
        height, width = image.shape[-2:]
        vae = self.vae
        if untiled(tile, height, width):
            pixels = _to_pixels(image, None, vae.dtype, vae.device)
            if strips and vae_strips.supports_encoder(vae.encoder):
                posterior = DiagonalGaussianDistribution(
                    self._encoder_tail(vae_strips.run_down_blocks(vae.encoder, pixels))
                )
            else:
                posterior = vae.encode(pixels).latent_dist
        else:
            features = run_chain(
                self._encoder_stages(),
                lambda box: _to_pixels(image, box, vae.dtype, vae.device),
                (height, width),
                tile,
                exact,
                checkpoint_bytes,
                vae.dtype.itemsize,
                on_tile,
            )
            posterior = DiagonalGaussianDistribution(self._encoder_tail(features))
        return posterior.mean.float(), posterior.std.float()

    def _encoder_tail(self, features: torch.Tensor) -> torch.Tensor:
        encoder = self.vae.encoder
        x = encoder.mid_block(features)
        del features
        x = encoder.conv_out(encoder.conv_act(encoder.conv_norm_out(x)))
        return self.vae.quant_conv(x) if self.vae.quant_conv is not None else x

    # -- decode --------------------------------------------------------------------------------

    def _decoder_stages(self) -> list[Stage]:
        """The up blocks after the middle block, cut before each upsampling (where the
        activation is 4x smaller than after it); the last stage ends with the output conv."""
        decoder = self.vae.decoder
        blocks = decoder.up_blocks
        stages, scale = [], Fraction(1)
        for index, block in enumerate(blocks):
            last = index == len(blocks) - 1
            previous = blocks[index - 1] if index > 0 else None
            parts = ((previous, "upsamplers"),) if previous is not None and previous.upsamplers else ()
            parts += ((block, "resnets"),)
            if last:
                parts += ((block, "upsamplers"),) if block.upsamplers else ()
                parts += ((decoder, "conv_norm_out"), (decoder, "conv_out"))

            def run(x, previous=previous, block=block, last=last):
                # UpDecoderBlock2D.forward, split at its upsampler.
                for upsampler in (previous.upsamplers or ()) if previous is not None else ():
                    x = upsampler(x)
                for resnet in block.resnets:
                    x = resnet(x, temb=None)
                if last:
                    for upsampler in block.upsamplers or ():
                        x = upsampler(x)
                    x = decoder.conv_out(decoder.conv_act(decoder.conv_norm_out(x)))
                return x

            if previous is not None:
                scale *= 2 ** len(previous.upsamplers or ())
            if last:
                stages.append(Stage(run, parts, self.vae.config.out_channels, scale * 2 ** len(block.upsamplers or ())))
            else:
                stages.append(Stage(run, parts, block.resnets[-1].out_channels, scale))
        return stages

    def _decoder_head(self, latents: torch.Tensor) -> torch.Tensor:
        """The decoder up to its up blocks, at latent resolution."""
        vae, decoder = self.vae, self.vae.decoder
        if vae.post_quant_conv is not None:
            latents = vae.post_quant_conv(latents)
        return decoder.mid_block(decoder.conv_in(latents), None)

    def decode(
        self,
        latents: torch.Tensor,
        tile: int = 0,
        exact: bool = True,
        on_tile: TileProgress | None = None,
        checkpoint_bytes: int = 0,
        strips: bool = False,
    ) -> torch.Tensor:
        """Unscaled latents -> decoder output in about [-1, 1], before clamping, float32.
        `tile` is the side of a tile's core in output pixels; 0 or at least the image: untiled.
        `strips`: untiled, the up blocks run in row strips (vae_strips: less memory, equal up to
        float rounding) where the decoder is built of stock layers."""
        vae = self.vae
        latents = latents.to(device=vae.device, dtype=vae.dtype)
        height, width = latents.shape[-2:]
        factor = self.factor
        if untiled(tile, height * factor, width * factor):
            if strips and vae_strips.supports_decoder(vae.decoder):
                return vae_strips.run_up_blocks(vae.decoder, self._decoder_head(latents)).float()
            return vae.decode(latents).sample.float()
        features = self._decoder_head(latents)
        out = torch.empty(
            (latents.shape[0], vae.config.out_channels, height * factor, width * factor),
            dtype=torch.float32,
            device=latents.device,
        )

        def crop(box: Box) -> torch.Tensor:
            top, left, box_h, box_w = box
            return features[:, :, top : top + box_h, left : left + box_w]

        return run_chain(
            self._decoder_stages(),
            crop,
            (height, width),
            max(1, tile // factor),
            exact,
            checkpoint_bytes,
            vae.dtype.itemsize,
            on_tile,
            out=out,
        )


def untiled(tile: int, height: int, width: int) -> bool:
    """Whether a pass over height x width pixels with tiles of `tile` pixels is one whole pass:
    no tile (0), or one as large as the image."""
    return tile <= 0 or tile >= max(height, width)


def _tile_pixels(config, height: int, width: int, tile: int = 0) -> int:
    """Pixels one pass covers: the whole image, or a tile of `tile` pixels with its halo."""
    if untiled(tile, height, width):
        return height * width
    halo = 16 * 2 ** (len(config.block_out_channels) - 1)  # a little above the SD decoder's 98 px and encoder's 72 px
    return min(height, tile + 2 * halo) * min(width, tile + 2 * halo)


def vae_peak_bytes(config, height: int, width: int, dtype_bytes: int, tile: int = 0, strips: bool = False) -> int:
    """Rough peak memory of a VAE pass over an image of height x width pixels, untiled or with
    tiles of `tile` pixels (their halo included). The middle block runs on the whole latent
    before (decoder) or after (encoder) the tiles, which meanwhile hold one copy of its tensor.
    `strips`: an untiled pass runs in row strips (VaeCodec.runs_in_strips)."""
    channels = list(config.block_out_channels)
    factor = 2 ** (len(channels) - 1)
    mid = channels[-1] * (height // factor) * (width // factor)
    tile_pixels = _tile_pixels(config, height, width, tile)
    live = _LIVE_IN_STRIPS if strips and untiled(tile, height, width) else _LIVE_ACTIVATIONS
    full = live * max(channels[0], channels[1] if len(channels) > 1 else 0) * tile_pixels
    return max(_LIVE_MID * mid, full + mid) * dtype_bytes


def vae_tile_fits(config, height: int, width: int, dtype_bytes: int, limits: DeviceLimits, tile: int = 0) -> bool:
    """Whether every single tensor of a pass (untiled, or tiles of `tile` pixels) stays within the
    device's per-tensor limits: the largest activation of a tile, the middle block's whole latent,
    and the float32 decoded image the tiles are written into."""
    factor = 2 ** (len(config.block_out_channels) - 1)
    mid = config.block_out_channels[-1] * -(-height // factor) * -(-width // factor)
    largest = vae_elements_per_pixel(config) * _tile_pixels(config, height, width, tile)
    return limits.fits(max(largest, mid), dtype_bytes) and limits.fits(config.out_channels * height * width, 4)


def cap_vae_tile(config, height: int, width: int, dtype_bytes: int, limits: DeviceLimits, tile: int) -> int:
    """`tile` (0: untiled), or the largest automatic tile below it whose tensors fit the device's
    per-tensor limits. Tiling is exact, so this changes the cost, not the result."""
    if vae_tile_fits(config, height, width, dtype_bytes, limits, tile):
        return tile
    covers = untiled(tile, height, width)
    for candidate in _AUTO_TILES:
        if (covers or candidate < tile) and vae_tile_fits(config, height, width, dtype_bytes, limits, candidate):
            return candidate
    return _AUTO_TILES[-1] if covers else min(tile, _AUTO_TILES[-1])  # only whole-image tensors are too large


def choose_vae_tile(
    config,
    height: int,
    width: int,
    dtype_bytes: int,
    budget: int,
    limits: DeviceLimits | None = None,
    strips: bool = False,
) -> int:
    """0 (untiled) when the whole image fits the memory budget, else the largest tile that does;
    with `limits`, also the largest whose every tensor fits the device's per-tensor limits.
    `strips`: untiled passes run in row strips, which need less memory.

    Tiling is exact, so this choice changes the cost, not the result."""
    limits = limits or DeviceLimits()

    def fits(tile: int) -> bool:
        return vae_peak_bytes(config, height, width, dtype_bytes, tile, strips) <= budget and vae_tile_fits(
            config, height, width, dtype_bytes, limits, tile
        )

    if fits(0):
        return 0
    for tile in _AUTO_TILES:
        if fits(tile):
            return tile
    return _AUTO_TILES[-1]
