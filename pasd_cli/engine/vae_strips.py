"""The VAE's full-resolution layers run layer by layer in row strips, to hold fewer whole-image
tensors: the decoder's up blocks and the encoder's down blocks (the middle blocks work at latent
resolution, which is small, and run stock).

Stock, a full-resolution resnet holds its input, the normalised and the activated copy and the
convolution's output at once: about 1 GB above the weights for SD's VAE decoding 512x512 in
float32, the peak of a whole default run on the CPU. Here every GroupNorm + SiLU + 3x3
convolution runs over strips of rows with a row of halo, the GroupNorm with the statistics of
the whole tensor (group_stats), and each resnet adds its shortcut strip by strip, writing into
its input's memory where the output is no wider. A layer then holds its input, one
intermediate and a strip; a resnet that narrows, and those after it, not even the
intermediate (`_resnet`). The encoder, stock, peaks at about 0.65 GB there.

One image on the CPU runs channels-last, where oneDNN's convolutions are faster (`_layout`);
writing into an input's memory then works on some of each pixel's channels instead of on whole
planes (`_writable`, `_slot`).

Every layer is diffusers' own module, called on strips (weight hooks apply); only float
rounding differs from the stock networks (GroupNorm's statistics, the convolution's algorithm on
a strip's shape). `supports_decoder` and `supports_encoder` say which qualify; others run stock.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import Decoder, Encoder
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import DownEncoderBlock2D, UpDecoderBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from .group_stats import GroupStats, normalise

# Bytes of one strip of a layer's input. Small enough that a strip's few temporaries are noise
# next to the whole-image tensors, large enough that a convolution's rows amortise its halo.
STRIP_BYTES = 16 << 20
# Each strip computes its halo rows again (one above, one below, per convolution): at least this
# many rows keep that under 6% however wide the image.
MIN_STRIP_ROWS = 32


def _plain_conv(conv: nn.Module, reach: int | None = None) -> bool:
    """A stride-1 zero-padded convolution whose padding equals its reach (output size = input)."""
    return (
        isinstance(conv, nn.Conv2d)
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros"
        and conv.kernel_size[0] == 2 * conv.padding[0] + 1
        and conv.kernel_size[1] == 2 * conv.padding[1] + 1
        and (reach is None or conv.padding[0] == reach)
    )


def _plain_resnet(block: nn.Module) -> bool:
    return (
        type(block) is ResnetBlock2D
        and block.upsample is None
        and block.downsample is None
        and block.time_emb_proj is None
        and type(block.norm1) is nn.GroupNorm
        and type(block.norm2) is nn.GroupNorm
        and type(block.nonlinearity) is nn.SiLU
        and _plain_conv(block.conv1, 1)
        and _plain_conv(block.conv2, 1)
        and (block.conv_shortcut is None or _plain_conv(block.conv_shortcut, 0))
    )


def _plain_upsampler(upsampler: nn.Module) -> bool:
    return (
        type(upsampler) is Upsample2D
        and upsampler.norm is None
        and not upsampler.use_conv_transpose
        and upsampler.interpolate
        and upsampler.use_conv
        and _plain_conv(upsampler.conv, 1)
    )


def _plain_downsampler(downsampler: nn.Module) -> bool:
    conv = downsampler.conv
    return (
        type(downsampler) is Downsample2D
        and downsampler.norm is None
        and downsampler.use_conv
        and downsampler.padding == 0  # then its forward pads one zero row and column after
        and isinstance(conv, nn.Conv2d)
        and conv.kernel_size == (3, 3)
        and conv.stride == (2, 2)
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
    )


def supports_encoder(encoder: nn.Module) -> bool:
    """Whether `encoder` is a stock VAE encoder built of the layers this module runs in strips."""
    return (
        type(encoder) is Encoder
        and _plain_conv(encoder.conv_in)
        and all(type(block) is DownEncoderBlock2D for block in encoder.down_blocks)
        and all(_plain_resnet(resnet) for block in encoder.down_blocks for resnet in block.resnets)
        and all(_plain_downsampler(down) for block in encoder.down_blocks for down in block.downsamplers or ())
    )


def supports_decoder(decoder: nn.Module) -> bool:
    """Whether `decoder` is a stock VAE decoder built of the layers this module runs in strips."""
    return (
        type(decoder) is Decoder
        and all(type(block) is UpDecoderBlock2D for block in decoder.up_blocks)
        and all(_plain_resnet(resnet) for block in decoder.up_blocks for resnet in block.resnets)
        and all(_plain_upsampler(up) for block in decoder.up_blocks for up in block.upsamplers or ())
        and type(decoder.conv_norm_out) is nn.GroupNorm
        and type(decoder.conv_act) is nn.SiLU
        and _plain_conv(decoder.conv_out, 1)
    )


def _layout(tensor: torch.Tensor) -> torch.memory_format:
    """Channels-last where the channels are innermost: a channels-last tensor, or some of the
    channels of one (a resnet's output written into a wider input's memory)."""
    channels_last = not tensor.is_contiguous() and tensor.stride(1) == 1
    return torch.channels_last if channels_last else torch.contiguous_format


def _networks_layout(conv: nn.Conv2d, x: torch.Tensor) -> torch.memory_format:
    """Channels-last where the networks' weights are (CUDA: PASDPipeline.optimize), and for one
    image on the CPU, where oneDNN's channels-last convolutions ran the VAE's 1.1-2x faster than
    on planes (fp32, 128-512 channels, strips 512 wide). The input is put in it first: the
    middle block's attention hands over a channels-last view on the CPU too, which would
    otherwise carry that layout into every whole-image buffer."""
    one_image_on_cpu = x.device.type == "cpu" and x.shape[0] == 1
    return torch.channels_last if one_image_on_cpu else _layout(conv.weight)


def _empty(x: torch.Tensor, channels: int, height: int, width: int) -> torch.Tensor:
    """A whole-image buffer in x's memory layout."""
    shape = (x.shape[0], channels, height, width)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_layout(x))


def _strip_rows(x: torch.Tensor, channels: int) -> int:
    batch, _, _, width = x.shape
    return max(MIN_STRIP_ROWS, STRIP_BYTES // (batch * channels * width * x.element_size()))


def _strips(height: int, rows: int):
    for top in range(0, height, rows):
        yield top, min(top + rows, height)


def _conv_rows(
    conv: nn.Conv2d, source: torch.Tensor, top: int, bottom: int, prepare: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Rows [top, bottom) of conv(prepare(source)), from a strip of source with the conv's halo:
    inside the image the halo rows are real neighbours; at its border the conv's zero padding
    is the whole convolution's own."""
    reach = conv.padding[0]
    start, stop = max(top - reach, 0), min(bottom + reach, source.shape[-2])
    out = conv(prepare(source[:, :, start:stop]))
    return out[:, :, top - start : bottom - start]


def _norm_act(x: torch.Tensor, norm: nn.GroupNorm, rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """SiLU(GroupNorm(piece)) for pieces of x, with the statistics of the whole of x."""
    stats = GroupStats()
    for top, bottom in _strips(x.shape[-2], rows):
        stats.add_values(x[:, :, top:bottom], norm.num_groups)
    scale, shift = stats.scale_shift(norm, x.device)
    return lambda piece: F.silu(normalise(piece, scale, shift), inplace=True)


def _writable(x: torch.Tensor) -> bool:
    """Whether a layer may write into x's memory, strip by strip: where row r of every
    same-shaped slot of it lies in x's row r. So in NCHW, where a slot is whole planes (a plane
    is one channel of one image, H x W), and for one image channels-last, where a slot is some
    of each pixel's channels; not for several images channels-last, where rows of one image
    follow those of the previous one."""
    if x.is_contiguous():
        return True
    _, _, height, width = x.shape
    pixel = x.stride(-1)
    return x.shape[0] == 1 and x.stride(1) == 1 and x.stride(-2) == width * pixel and pixel >= x.shape[1]


def _slot(x: torch.Tensor, first: int, batch: int, channels: int) -> torch.Tensor:
    """A (batch, channels, H, W) tensor on the memory of a `_writable` x, from x's plane (NCHW)
    or channel (one image, channels-last) `first` on; it may reach beyond x's own."""
    _, _, height, width = x.shape
    if x.is_contiguous():
        plane = height * width
        strides = (channels * plane, plane, width, 1)
        return x.as_strided((batch, channels, height, width), strides, x.storage_offset() + first * plane)
    pixel = x.stride(-1)
    strides = (height * width * pixel, 1, width * pixel, pixel)
    return x.as_strided((1, channels, height, width), strides, x.storage_offset() + first)


def _spare(x: torch.Tensor) -> int:
    """Slots (planes, or channels of each pixel) of memory beyond a `_writable` x's own, left by a
    resnet that narrowed (the rest of its input's memory): free for a later intermediate."""
    if not _writable(x) or x.storage_offset() != 0:
        return 0
    if not x.is_contiguous():
        return x.stride(-1) - x.shape[1]
    used = x.numel() * x.element_size()
    return (x.untyped_storage().nbytes() - used) // (x.shape[-2] * x.shape[-1] * x.element_size())


def _first_conv(block: ResnetBlock2D, x: torch.Tensor, hidden: torch.Tensor, rows: int) -> None:
    prepare = _norm_act(x, block.norm1, rows)
    for top, bottom in _strips(x.shape[-2], rows):
        hidden[:, :, top:bottom] = _conv_rows(block.conv1, x, top, bottom, prepare)


def _first_conv_over_input(block: ResnetBlock2D, x: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A narrowing resnet's conv1 output and shortcut, written over a `_writable` x's own slots as
    each strip of x is used: (shortcut, hidden). A strip reads its rows of x, and conv1 one row
    beyond on either side, before its results overwrite those rows (of other slots); the row
    above it, already overwritten, was kept from the previous strip."""
    batch, _, height, _ = x.shape
    shortcut = _slot(x, 0, batch, block.conv2.out_channels)
    hidden = _slot(x, batch * block.conv2.out_channels, batch, block.conv1.out_channels)
    prepare = _norm_act(x, block.norm1, rows)  # the statistics of x before anything is written
    reach = block.conv1.padding[0]
    above = x[:, :, :0]  # the rows just above the strip, as they were
    for top, bottom in _strips(height, rows):
        source = torch.cat([above, x[:, :, top : min(bottom + reach, height)]], dim=2)
        start = top - above.shape[2]
        conv_rows = block.conv1(prepare(source))[:, :, top - start : bottom - start]
        shortcut_rows = block.conv_shortcut(x[:, :, top:bottom])
        above = x[:, :, max(bottom - reach, top) : bottom].clone()
        shortcut[:, :, top:bottom] = shortcut_rows
        hidden[:, :, top:bottom] = conv_rows
    return shortcut, hidden


def _resnet(block: ResnetBlock2D, x: torch.Tensor) -> torch.Tensor:
    """ResnetBlock2D.forward without a time embedding. Consumes x: the output may be written
    into x's memory, and so may the intermediate (conv1's output), which at full resolution is
    as large as a whole-image tensor: in the slots after x's own where a narrowing resnet left
    spare memory, or over x itself where the resnet narrows. SD's decoder at 512x512 then holds one
    256-channel tensor through its last block instead of that plus a 128-channel one."""
    batch, channels, height, width = x.shape
    out_channels, hidden_channels = block.conv2.out_channels, block.conv1.out_channels
    rows = _strip_rows(x, max(channels, out_channels))
    residual: torch.Tensor | None = None
    if _spare(x) >= batch * hidden_channels:
        hidden = _slot(x, batch * channels, batch, hidden_channels)
        _first_conv(block, x, hidden, rows)
    elif _writable(x) and block.conv_shortcut is not None and out_channels + hidden_channels <= channels:
        residual, hidden = _first_conv_over_input(block, x, rows)
    else:
        hidden = _empty(x, hidden_channels, height, width)
        _first_conv(block, x, hidden, rows)
    # Output row r overwrites only row r of some slot of x, and each strip reads its rows of x
    # before writing them, later strips only later rows.
    if _writable(x) and out_channels <= channels:
        out = _slot(x, 0, batch, out_channels)
    else:
        out = _empty(x, out_channels, height, width)
    prepare = _norm_act(hidden, block.norm2, rows)
    for top, bottom in _strips(height, rows):
        if residual is not None:
            residual_rows = residual[:, :, top:bottom]
        else:
            residual_rows = x[:, :, top:bottom]
            if block.conv_shortcut is not None:
                residual_rows = block.conv_shortcut(residual_rows)
        out[:, :, top:bottom] = (residual_rows + _conv_rows(block.conv2, hidden, top, bottom, prepare)) / (
            block.output_scale_factor
        )
    return out


def _compact(x: torch.Tensor) -> torch.Tensor:
    """x in memory of its own size. A resnet that narrows writes its output into the first
    slots of its wider input, whose memory the output then keeps alive: beside a 2x upsampler's
    output (4x x's size), the larger of the two would have made SD's decode peak."""
    if x.storage_offset() != 0 or x.untyped_storage().nbytes() > x.numel() * x.element_size():
        return x.clone(memory_format=_layout(x))
    return x


def _upsample(upsampler: Upsample2D, x: torch.Tensor) -> torch.Tensor:
    """Nearest 2x, then the 3x3 convolution, by strips of output rows."""
    _, _, height, width = x.shape
    channels = upsampler.conv.out_channels
    out = _empty(x, channels, 2 * height, 2 * width)
    # Upsampled, a strip has twice the rows and (with oneDNN's reordered copies) four
    # temporaries beside a whole-image output: a quarter of the usual rows keeps them small.
    rows = max(1, MIN_STRIP_ROWS // 4, _strip_rows(x, 4 * max(x.shape[1], channels)) // 4)
    for top, bottom in _strips(height, rows):
        # Output rows [2 top, 2 bottom) need one upsampled row beyond on either side.
        start, stop = max(top - 1, 0), min(bottom + 1, height)
        upsampled = F.interpolate(x[:, :, start:stop], scale_factor=2.0, mode="nearest")
        first, last = max(2 * top - 1, 0), min(2 * bottom + 1, 2 * height)
        strip = upsampler.conv(upsampled[:, :, first - 2 * start : last - 2 * start])
        out[:, :, 2 * top : 2 * bottom] = strip[:, :, 2 * top - first : 2 * bottom - first]
    return out


def run_up_blocks(decoder: Decoder, x: torch.Tensor) -> torch.Tensor:
    """Decoder.forward after the middle block: up blocks, norm, activation, output conv.
    Consumes x."""
    # Whatever memory x's owner gave beyond x is not the resnets' to use.
    x = _compact(x.contiguous(memory_format=_networks_layout(decoder.conv_out, x)))
    for block in decoder.up_blocks:
        for resnet in block.resnets:
            x = _resnet(resnet, x)
        for upsampler in block.upsamplers or ():
            x = _compact(x)  # on its own: the old view must go before the upsampler allocates
            x = _upsample(upsampler, x)
    _, _, height, width = x.shape
    out = _empty(x, decoder.conv_out.out_channels, height, width)
    rows = _strip_rows(x, x.shape[1])
    prepare = _norm_act(x, decoder.conv_norm_out, rows)
    for top, bottom in _strips(height, rows):
        out[:, :, top:bottom] = _conv_rows(decoder.conv_out, x, top, bottom, prepare)
    return out


def _downsample(downsampler: Downsample2D, x: torch.Tensor) -> torch.Tensor:
    """Downsample2D with padding 0: one zero row and column after, then the stride-2 3x3
    convolution, by strips of output rows. Output row i reads input rows 2i to 2i + 2."""
    _, _, height, width = x.shape
    conv = downsampler.conv
    out_height, out_width = (height - 2) // 2 + 1, (width - 2) // 2 + 1
    out = _empty(x, conv.out_channels, out_height, out_width)
    rows = max(1, _strip_rows(x, x.shape[1]) // 2)
    for top, bottom in _strips(out_height, rows):
        stop = 2 * bottom + 1
        piece = F.pad(x[:, :, 2 * top : min(stop, height)], (0, 1, 0, max(0, stop - height)))
        out[:, :, top:bottom] = conv(piece)
    return out


def run_down_blocks(encoder: Encoder, pixels: torch.Tensor) -> torch.Tensor:
    """Encoder.forward before the middle block: input conv, down blocks."""
    _, _, height, width = pixels.shape
    pixels = pixels.contiguous(memory_format=_networks_layout(encoder.conv_in, pixels))
    x = _empty(pixels, encoder.conv_in.out_channels, height, width)
    rows = _strip_rows(x, x.shape[1])
    for top, bottom in _strips(height, rows):
        x[:, :, top:bottom] = _conv_rows(encoder.conv_in, pixels, top, bottom, lambda piece: piece)
    for block in encoder.down_blocks:
        for resnet in block.resnets:
            x = _resnet(resnet, x)
        for downsampler in block.downsamplers or ():
            x = _downsample(downsampler, x)
    return x
