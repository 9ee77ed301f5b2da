"""Weights converted at load, kept on disk so that later loads map them instead of converting.

Casting a network's weights into another dtype as they are read is bound by memory, not by the
arithmetic: on a 2-core CPU, converting SD-1.5's UNet and ControlNet from float16 into bfloat16
took 1.5 of the default's 2.0 s load, most of it the system zeroing the 3 GB of fresh pages the
results go to. A file that already holds the converted tensors is mapped instead: its pages are
the page cache's, and the load is the header and the model's construction (0.6 s). Converting
per layer as each one runs would load as fast, but it costs every denoising step 13%.

The fast mode merges the LCM-LoRA into the converted UNet at each load (1.2 s at SD size, most of
it the products up @ down): its merged UNet is kept too, named for the LoRA's file as well, and a
later fast load maps it and merges nothing.

The file is a safetensors file whose every tensor starts at a multiple of ALIGN bytes, as the
allocator's memory does, so the matrix kernels see the same alignment and compute bit for bit
what they compute on weights converted in memory; padding entries (named PAD_PREFIX...) fill the
gaps. Its metadata names the source files, their sizes and modification times, and the dtype: a
changed source gets a new file, and the old one is removed when it is. It is written atomically
once, after a load that converted, and any failure to write or read it falls back to converting.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..atomic import remove_stale, write_atomic
from ..errors import PasdError
from .tensor_file import DTYPE_NAMES, read_tensors

ALIGN = 64
PAD_PREFIX = "__pasd_pad__."
FORMAT = "1"
SUFFIX = ".safetensors"
# Free space a copy must leave on its disk.
KEEP_FREE = 2 << 30
# Files merged into a copy after the conversion, each with its weight (a LoRA fused at 1.0).
Merges = Sequence[tuple[Path, float]]


class ConvertedWeights:
    """Converted copies of weight files in `folder` (made on the first write). `background`:
    copies are written by a thread, one after another, while the caller goes on (writing SD
    size's 2.9 GB took 1-5 s here); the tensors must not change until `wait` returns, and a
    process that exits first leaves a part-written file that the next write removes. A copy is
    written only where the disk keeps `keep_free` bytes free after it."""

    def __init__(self, folder: Path, background: bool = False, keep_free: int = KEEP_FREE):
        self.folder = Path(folder)
        self.background = background
        self.keep_free = keep_free
        self.written: list[Path] = []  # the copies written so far
        self._writers: list[threading.Thread] = []

    def wait(self) -> None:
        """Until the copies being written in the background are written."""
        while self._writers:
            self._writers.pop(0).join()

    def path_for(self, source: Path, dtype: torch.dtype, merged: Merges = ()) -> Path:
        """The converted copy of `source` in `dtype` (with the `merged` files merged into it at
        their weights): named for the files' paths (so that a new version of one replaces the
        old copy) and for their versions, the weights and the dtype."""
        files = [Path(source).resolve(), *(Path(path).resolve() for path, _ in merged)]
        where = _digest("\0".join(map(str, files)))
        versions = "\0".join(f"{stat.st_size}\0{stat.st_mtime_ns}" for stat in map(os.stat, files))
        weights = "\0".join(repr(float(weight)) for _, weight in merged)
        version = _digest(f"{versions}\0{weights}\0{DTYPE_NAMES[dtype]}\0{FORMAT}")
        return self.folder / f"{where}-{version}{SUFFIX}"

    def read(
        self, source: Path, dtype: torch.dtype, mapped: bool, merged: Merges = ()
    ) -> dict[str, torch.Tensor] | None:
        """The converted copy's tensors (`mapped`: the file's pages, as read_tensors maps kept
        ones), or None where there is none or it is damaged (then it is removed)."""
        try:
            path = self.path_for(source, dtype, merged)
            if not path.is_file():
                return None
            state = read_tensors(path, mapped=mapped, map_stored=ALIGN if mapped else 0)
        except (OSError, ValueError):
            _remove_quietly(locals().get("path"))
            return None
        return {name: tensor for name, tensor in state.items() if not name.startswith(PAD_PREFIX)}

    def write(
        self, source: Path, dtype: torch.dtype, state: dict[str, torch.Tensor], merged: Merges = ()
    ) -> Path | None:
        """Keep `state`, `source` converted into `dtype` (and `merged` merged into it), for the
        next loads; returns its path, or None where it could not be written (a read-only or full
        disk: loading goes on); in the background, None at once."""
        try:
            path = self.path_for(source, dtype, merged)
            metadata = _metadata(source, dtype, merged)
        except OSError:
            return None
        if not self.background:
            return self._write(path, state, metadata)
        previous = self._writers[-1] if self._writers else None

        def write() -> None:
            if previous is not None:
                previous.join()
            self._write(path, state, metadata)

        # A daemon: an interrupted run does not wait for its copy.
        writer = threading.Thread(target=write, name="pasd-converted-weights", daemon=True)
        self._writers.append(writer)
        writer.start()
        return None

    def _write(self, path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path | None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            remove_stale(self.folder)  # a writer killed outright left its part-written copy
            if not self._room_for(sum(t.numel() * t.element_size() for t in state.values())):
                return None
            write_atomic(path, lambda handle: write_aligned(handle, state, metadata))
        except (OSError, PasdError):
            return None
        self._remove_outdated(path)
        self.written.append(path)
        return path

    def _room_for(self, nbytes: int) -> bool:
        """Whether the disk keeps `keep_free` bytes free once the copy is written: a copy only
        saves time, and must not take the space a run's outputs need."""
        return shutil.disk_usage(self.folder).free - nbytes >= self.keep_free

    def _remove_outdated(self, kept: Path) -> None:
        """Earlier copies of the same source file (a new version of it, or another dtype, makes a
        file of its own; only the newest is kept), and those `prune` removes."""
        where = kept.name.split("-", 1)[0]
        for other in self.folder.glob(f"{where}-*{SUFFIX}"):
            if other != kept:
                _remove_quietly(other)
        self.prune()

    def prune(self) -> list[Path]:
        """Remove the copies whose source files are gone or changed (a model removed or
        updated); returns them."""
        removed = [copy for copy in self.folder.glob(f"*{SUFFIX}") if not _source_unchanged(copy)]
        for copy in removed:
            _remove_quietly(copy)
        return removed


def write_aligned(handle, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """`state` as a safetensors file whose tensors all start at multiples of ALIGN bytes."""
    entries: dict[str, object] = {"__metadata__": metadata}
    parts: list[torch.Tensor | int] = []  # a tensor, or a number of padding bytes
    offset = 0
    for name, tensor in state.items():
        if name.startswith(PAD_PREFIX):
            raise ValueError(f"tensor name {name} is reserved for padding")
        pad = -offset % ALIGN
        if pad:
            padding = {"dtype": "U8", "shape": [pad], "data_offsets": [offset, offset + pad]}
            entries[f"{PAD_PREFIX}{len(parts)}"] = padding
            parts.append(pad)
            offset += pad
        nbytes = tensor.numel() * tensor.element_size()
        entries[name] = {
            "dtype": DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        parts.append(tensor)
        offset += nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    # Spaces after the JSON (the format allows them) put the data's start on ALIGN bytes too.
    header += b" " * (-(8 + len(header)) % ALIGN)
    handle.write(struct.pack("<Q", len(header)))
    handle.write(header)
    for part in parts:
        if isinstance(part, int):
            handle.write(bytes(part))
        elif part.numel():
            handle.write(part.detach().contiguous().view(-1).view(torch.uint8).numpy().data)


def _source_unchanged(copy: Path) -> bool:
    """Whether the files `copy` was made from are all still there, as they were."""
    try:
        with safe_open(str(copy), "pt") as stored:
            recorded = json.loads((stored.metadata() or {})["files"])
        return all(_file_version(path) == version for path, version in recorded.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError):
        return False


def _metadata(source: Path, dtype: torch.dtype, merged: Merges) -> dict[str, str]:
    files = [Path(source).resolve(), *(Path(path).resolve() for path, _ in merged)]
    return {
        "pasd_converted": FORMAT,
        "dtype": DTYPE_NAMES[dtype],
        # {path: [size, modification time in ns]}: the source file first, then the merged ones.
        "files": json.dumps({str(path): _file_version(path) for path in files}),
        "merged_weights": json.dumps([float(weight) for _, weight in merged]),
    }


def _file_version(path: Path | str) -> list[int]:
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _remove_quietly(path: Path | None) -> None:
    if path is None:
        return
    try:
        os.unlink(path)
    except OSError:
        pass
