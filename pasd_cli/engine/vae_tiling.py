"""Running part of a network over tiles so that the result equals the untiled one.

Two things make a tiled convolutional network differ from the whole-image one:

* Convolutions near a tile's edge see zeros instead of their neighbours. Each tile is therefore
  cut with a halo wide enough that the wrong values never reach its core; at the image's true
  border the tile is cut flush, so the zero padding there is the real one.
* GroupNorm normalises with statistics over the whole image. Here every GroupNorm of the
  section uses statistics pooled over all tiles' cores: one pass over the tiles per GroupNorm,
  in execution order, each running the section up to that GroupNorm (with the statistics of the
  earlier ones already known) and accumulating per-group count, mean and squared deviations,
  merged across tiles in float64 (Chan et al.). A last pass produces the output.

Memory is that of one tile; the price is recomputation: pass k runs the section up to its k-th
GroupNorm, so the whole costs about (number of GroupNorms / 2 + 1) untiled passes, weighted to
where the compute is (see the README). `exact=False` instead normalises each tile with its own
statistics, in one pass, as other tiled VAEs do: this shows visible steps at tile borders.

The halo and the GroupNorm order come from a probe run of the section on a small input: every
convolution widens the band of wrong pixels at a tile edge by its reach, a 2x nearest upsampling
doubles it, a stride-2 convolution halves it (rounded up, plus one for the padding).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn

from .group_stats import GroupStats, normalise

# (top, left, height, width)
Box = tuple[int, int, int, int]
TileProgress = Callable[[int, int], None]


class _StopPass(Exception):
    """Raised by the GroupNorm being measured: nothing after it is needed in this pass."""


@dataclass
class _TileState:
    input_size: tuple[int, int]
    core: Box  # in section-input pixels, relative to the tile


class PooledGroupNorm(nn.Module):
    """Stands in for one nn.GroupNorm while a section runs tiled."""

    def __init__(self, norm: nn.GroupNorm, section: TiledSection):
        super().__init__()
        self.norm = norm
        self.section = section
        self.mode = "native"  # native | collect | apply
        self.stats = GroupStats()
        self._scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.section.probing is not None:
            self.section.probing.saw_norm(self, x)
        if self.mode == "native":
            return self.norm(x)
        if self.mode == "collect":
            self._collect(x)
            raise _StopPass
        return self._apply(x)

    def _core(self, x: torch.Tensor) -> torch.Tensor:
        state = self.section.state
        in_h, in_w = state.input_size
        top, left, height, width = state.core
        sy, sx = Fraction(x.shape[-2], in_h), Fraction(x.shape[-1], in_w)
        edges = [top * sy, (top + height) * sy, left * sx, (left + width) * sx]
        if any(edge.denominator != 1 for edge in edges):
            raise RuntimeError("tile core does not align with this layer's resolution")
        y0, y1, x0, x1 = (int(edge) for edge in edges)
        return x[:, :, y0:y1, x0:x1]

    def _collect(self, x: torch.Tensor) -> None:
        core = self._core(x)
        groups = self.norm.num_groups
        self.stats.add_values(core, groups)

    def finish(self) -> None:
        """Turn the pooled statistics into a per-channel scale and shift."""
        norm = self.norm
        self._scale_shift = self.stats.scale_shift(norm, norm.weight.device if norm.affine else None)
        self.mode = "apply"

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self._scale_shift
        return normalise(x, scale, shift)


class _Probe:
    """Follows the band of wrong pixels at a tile edge through the section."""

    def __init__(self, input_height: int):
        self.input_height = input_height
        self.height = input_height
        self.band = 0
        self.norms: list[tuple[PooledGroupNorm, int]] = []

    def _resolution(self, height: int) -> None:
        if height == 2 * self.height:  # nearest 2x upsampling since the last layer
            self.band *= 2
            self.height = height

    def saw_conv(self, conv: nn.Conv2d, x: torch.Tensor, out: torch.Tensor) -> None:
        self._resolution(x.shape[-2])
        reach = (conv.kernel_size[0] - 1) * conv.dilation[0]
        stride = conv.stride[0]
        self.band = self.band + math.ceil(reach / 2) if stride == 1 else (self.band + reach) // stride + 1
        self.height = out.shape[-2]

    def saw_norm(self, norm: PooledGroupNorm, x: torch.Tensor) -> None:
        self._resolution(x.shape[-2])
        self.norms.append((norm, self.halo()))

    def halo(self) -> int:
        """The band, in section-input pixels."""
        return math.ceil(self.band * self.input_height / self.height)


@dataclass
class _Plan:
    norms: list[PooledGroupNorm]
    norm_halos: list[int]
    halo: int
    scale: Fraction  # output size / input size
    example: torch.Tensor  # the probe's output: batch, channels, dtype, device


class TiledSection:
    """A section of a network (`forward`) run over tiles of its input, exactly.

    `parts` are (parent module, attribute) pairs whose GroupNorms belong to the section; they
    are swapped for PooledGroupNorm while the section runs and restored afterwards. `align` is
    the multiple that tile edges keep in input pixels (8 where the section downsamples 8x).
    """

    def __init__(
        self, forward: Callable[[torch.Tensor], torch.Tensor], parts: list[tuple[nn.Module, str]], align: int = 1
    ):
        self.forward = forward
        self.parts = parts
        self.align = align
        self.state: _TileState | None = None
        self.probing: _Probe | None = None

    @contextmanager
    def _pooled_norms(self) -> Iterator[list[PooledGroupNorm]]:
        swapped: list[tuple[nn.Module, str, nn.GroupNorm]] = []
        for root_parent, root_name in self.parts:
            root = getattr(root_parent, root_name)
            targets = (
                [(root_parent, root_name, root)]
                if isinstance(root, nn.GroupNorm)
                else [
                    (
                        root.get_submodule(name.rpartition(".")[0]) if "." in name else root,
                        name.rpartition(".")[2],
                        module,
                    )
                    for name, module in root.named_modules()
                    if isinstance(module, nn.GroupNorm)
                ]
            )
            for parent, name, module in targets:
                setattr(parent, name, PooledGroupNorm(module, self))
                swapped.append((parent, name, module))
        try:
            yield [getattr(parent, name) for parent, name, _ in swapped]
        finally:
            for parent, name, module in swapped:
                setattr(parent, name, module)

    def _probe(self, example: torch.Tensor) -> _Plan:
        probe = _Probe(example.shape[-2])
        convs = [
            module
            for parent, name in self.parts
            for module in getattr(parent, name).modules()
            if isinstance(module, nn.Conv2d)
        ]
        hooks = [conv.register_forward_hook(lambda m, args, out: probe.saw_conv(m, args[0], out)) for conv in convs]
        self.probing = probe
        self.state = _TileState(tuple(example.shape[-2:]), (0, 0, *example.shape[-2:]))
        try:
            out = self.forward(example)
        finally:
            self.probing = None
            for hook in hooks:
                hook.remove()
        norms = [norm for norm, _ in probe.norms]
        if len(set(map(id, norms))) != len(norms):
            raise RuntimeError("a GroupNorm runs twice in one section; tiling cannot pool it")
        return _Plan(
            norms,
            [halo for _, halo in probe.norms],
            probe.halo(),
            Fraction(out.shape[-2], example.shape[-2]),
            out[:, :, :0, :0],
        )

    def cores(self, height: int, width: int, tile: int) -> list[Box]:
        """Tile cores partitioning the input: equal sizes, edges on multiples of `align`."""
        tile = max(self.align, tile // self.align * self.align)

        def cuts(length: int) -> list[int]:
            count = math.ceil(length / tile)
            return [round(length * k / count / self.align) * self.align for k in range(count)] + [length]

        rows, cols = cuts(height), cuts(width)
        return [
            (top, left, bottom - top, right - left)
            for top, bottom in zip(rows, rows[1:])
            for left, right in zip(cols, cols[1:])
        ]

    def run(
        self,
        source: Callable[[Box], torch.Tensor],
        size: tuple[int, int],
        tile: int,
        exact: bool = True,
        on_tile: TileProgress | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`source(box)` returns the section input under a box (top, left, height, width) of the
        input of `size` (height, width). Returns the whole output (or fills `out`)."""
        height, width = size
        if height % self.align or width % self.align:
            raise ValueError(f"input {width}x{height} is not a multiple of {self.align}")
        cores = self.cores(height, width, tile)
        with self._pooled_norms():
            probe_side = min(16 * self.align, height, width)
            plan = self._probe(source((0, 0, probe_side, probe_side)))
            passes = len(plan.norms) + 1 if exact else 1
            done, total = 0, passes * len(cores)
            if exact:
                for index, norm in enumerate(plan.norms):
                    norm.mode = "collect"
                    for core in cores:
                        try:
                            self._run_tile(source, size, core, plan.norm_halos[index])
                        except _StopPass:
                            pass
                        else:
                            raise RuntimeError("a tile pass ended without reaching its GroupNorm")
                        done += 1
                        if on_tile:
                            on_tile(done, total)
                    norm.finish()
            scale = plan.scale
            if out is None:
                batch, channels = plan.example.shape[:2]
                out = plan.example.new_empty((batch, channels, int(height * scale), int(width * scale)))
            for core in cores:
                result, (y0, x0) = self._run_tile(source, size, core, plan.halo)
                top, left, core_h, core_w = core
                oy, ox, oh, ow = (int(v * scale) for v in (y0, x0, core_h, core_w))
                out[:, :, int(top * scale) : int(top * scale) + oh, int(left * scale) : int(left * scale) + ow] = (
                    result[:, :, oy : oy + oh, ox : ox + ow]
                )
                done += 1
                if on_tile:
                    on_tile(done, total)
            return out

    def _run_tile(self, source, size: tuple[int, int], core: Box, halo: int):
        """Run the section on a core plus its halo (cut flush at the image border); returns the
        output and where the core starts inside the tile."""
        height, width = size
        halo = math.ceil(halo / self.align) * self.align
        top, left, core_h, core_w = core
        y0, x0 = max(0, top - halo), max(0, left - halo)
        y1, x1 = min(height, top + core_h + halo), min(width, left + core_w + halo)
        self.state = _TileState((y1 - y0, x1 - x0), (top - y0, left - x0, core_h, core_w))
        return self.forward(source((y0, x0, y1 - y0, x1 - x0))), (top - y0, left - x0)


@dataclass(frozen=True)
class Stage:
    """One step of a chain of layers: `run(x)`, the modules it uses (see TiledSection), and its
    output's channels and size relative to the chain's input."""

    run: Callable[[torch.Tensor], torch.Tensor]
    parts: tuple[tuple[nn.Module, str], ...]
    out_channels: int
    out_scale: Fraction


def plan_sections(
    stages: list[Stage], size: tuple[int, int], dtype_bytes: int, checkpoint_bytes: int
) -> list[list[Stage]]:
    """Cut the chain after a stage when its whole-image output and the previous cut's fit in
    `checkpoint_bytes` together: the sections after a cut start from that stored tensor instead
    of recomputing everything before it in each GroupNorm pass. 0: one section, memory of one
    tile only."""
    sections, current, previous = [], [], 0
    for index, stage in enumerate(stages):
        current.append(stage)
        if index == len(stages) - 1:
            break
        scale = stage.out_scale
        stored = stage.out_channels * int(size[0] * scale) * int(size[1] * scale) * dtype_bytes
        if previous + stored <= checkpoint_bytes:
            sections.append(current)
            current, previous = [], stored
    return sections + [current]


def run_chain(
    stages: list[Stage],
    source: Callable[[Box], torch.Tensor],
    size: tuple[int, int],
    tile: int,
    exact: bool = True,
    checkpoint_bytes: int = 0,
    dtype_bytes: int = 4,
    on_tile: TileProgress | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run a chain of stages tiled, in sections (see plan_sections). `tile` is the side of a
    tile's core in chain-input pixels; the last section fills `out` if given."""
    sections = plan_sections(stages, size, dtype_bytes, checkpoint_bytes)
    in_scale = Fraction(1)
    for number, section_stages in enumerate(sections):
        out_scale = section_stages[-1].out_scale
        # A section that downsamples keeps its tile edges on multiples of its factor.
        align = max(1, int(in_scale / out_scale))

        def forward(x, section_stages=section_stages):
            for stage in section_stages:
                x = stage.run(x)
            return x

        parts = [part for stage in section_stages for part in stage.parts]
        section = TiledSection(forward, parts, align)
        last = number == len(sections) - 1
        result = section.run(source, size, max(align, int(tile * in_scale)), exact, on_tile, out=out if last else None)
        if last:
            return result

        def source(box: Box, stored: torch.Tensor = result) -> torch.Tensor:
            top, left, height, width = box
            return stored[:, :, top : top + height, left : left + width]

        size = tuple(result.shape[-2:])
        in_scale = out_scale
