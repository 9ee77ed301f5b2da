"""Read a safetensors file tensor by tensor, each cast to the compute dtype as it arrives.

safetensors' own loaders map the whole file into memory: every page they touch stays resident
(and counted in the process's RSS) until the file is closed, so loading a 2 GB UNet in bfloat16
from a float16 file peaks at the converted weights plus the whole file. Here each tensor to be
converted is read with plain file reads and converted at once, so the peak is the converted
weights plus one tensor of the file; no full-precision copy of the model ever exists.

A tensor used in the dtype the file stores it in is not read at all: it is the file's own pages,
mapped copy-on-write, which the system reads when the tensor is first used and may drop again
under memory pressure (they are clean). Loading is then the header and the model's construction.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import torch

# The safetensors format's dtype names (little-endian).
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
# A header larger than this is a damaged file, not a model (safetensors' own limit).
_MAX_HEADER = 100_000_000


def read_header(handle) -> tuple[dict, int]:
    """(the header's tensor entries, the offset where the data starts)."""
    raw = handle.read(8)
    if len(raw) != 8:
        raise ValueError("file too short for a safetensors header")
    (length,) = struct.unpack("<Q", raw)
    if length > _MAX_HEADER:
        raise ValueError(f"header of {length} bytes is too large")
    try:
        header = json.loads(handle.read(length))
    except ValueError as exc:
        raise ValueError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    header.pop("__metadata__", None)
    return header, 8 + length


class _Reader:
    """Reads tensors from an open file. A tensor to be cast is read into one scratch buffer that
    every such tensor reuses, so the only allocations that stay are the results: freed
    temporaries of many sizes would fragment the heap and keep the process's RSS up."""

    def __init__(self, handle, start: int, size: int, mapped=None, map_stored: int = 0):
        self.handle, self.start, self.size, self.mapped = handle, start, size, mapped
        self.map_stored = map_stored
        self._scratch = torch.empty(0, dtype=torch.uint8)

    def read(self, name: str, entry, dtype: torch.dtype | None, keep: frozenset = frozenset()) -> torch.Tensor:
        try:
            stored = _DTYPES[entry["dtype"]]
            shape = [int(n) for n in entry["shape"]]
            begin, end = (int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor {name}: malformed or unsupported header entry {entry}") from None
        numel = 1
        for n in shape:
            numel *= n
        nbytes = numel * stored.itemsize
        if end - begin != nbytes or begin < 0 or self.start + end > self.size:
            raise ValueError(f"tensor {name}: data offsets {begin}..{end} do not match its shape or the file")
        cast = dtype is not None and stored.is_floating_point and stored != dtype and stored not in keep
        kept = stored in keep and dtype is not None and stored != dtype
        if kept and self.mapped is not None and nbytes and (self.start + begin) % stored.itemsize == 0:
            # Kept in half precision, to be widened as each layer runs: the file's own pages,
            # mapped copy-on-write (a later in-place merge makes private copies of the pages it
            # writes; the file never changes).
            return self._mapped(stored, shape, begin, nbytes)
        # A tensor used as stored is mapped only where the file aligns it as the allocator would
        # (`map_stored`): on the file's own alignment the matrix kernels' sums differ in the last
        # bit (1 level in the tiny model's output).
        aligned = self.map_stored and (self.start + begin) % self.map_stored == 0
        if not cast and not kept and aligned and self.mapped is not None and nbytes:
            return self._mapped(stored, shape, begin, nbytes)
        if not cast:
            out = torch.empty(shape, dtype=stored)
            self._fill(out.view(-1).view(torch.uint8), name)
            return out
        if self._scratch.numel() < nbytes:
            self._scratch = torch.empty(nbytes, dtype=torch.uint8)
        raw = self._scratch[:nbytes]
        self._fill(raw, name)
        return raw.view(stored).view(shape).to(dtype)

    def _mapped(self, stored: torch.dtype, shape: list[int], begin: int, nbytes: int) -> torch.Tensor:
        raw = torch.frombuffer(self.mapped, dtype=torch.uint8, count=nbytes, offset=self.start + begin)
        return raw.view(stored).view(shape)

    def _fill(self, buffer: torch.Tensor, name: str) -> None:
        if not buffer.numel():
            return
        view = buffer.numpy()
        if self.handle.readinto(view) != view.nbytes:
            raise ValueError(f"tensor {name}: file ends inside its data")


def read_tensors(
    path: Path, dtype: torch.dtype | None = None, keep=frozenset(), mapped: bool = False, map_stored: int = 0
) -> dict[str, torch.Tensor]:
    """Every tensor of the file on the CPU; floating-point ones cast to `dtype` (None: as
    stored), except those stored in a dtype of `keep`. `mapped`: those kept are the file's pages,
    mapped (for weights used as they are: one that is replaced later, by a merge, would leave
    the pages it was read from resident while the file stays mapped); so are those used as
    stored whose data starts at a multiple of `map_stored` bytes (a file written aligned as the
    allocator aligns, converted_weights.py; 0: none). Raises ValueError for a damaged file."""
    path = Path(path)
    size = path.stat().st_size
    state: dict[str, torch.Tensor] = {}
    with path.open("rb", buffering=0) as handle:
        header, start = read_header(handle)
        reader = _Reader(handle, start, size, _map(handle, size) if mapped else None, map_stored)
        # In file order, so the reads go forward through the file.
        for name, entry in sorted(header.items(), key=lambda item: _begin(item[1])):
            if _begin(entry) >= 0:
                handle.seek(start + _begin(entry))
            state[name] = reader.read(name, entry, dtype, frozenset(keep))
    return state


def _map(handle, size: int):
    """The file mapped copy-on-write, or None where it cannot be (an empty file, no mmap)."""
    try:
        return mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_COPY) if size else None
    except (OSError, ValueError):
        return None


def float_dtypes(path: Path) -> set[torch.dtype]:
    """The floating-point dtypes the file's tensors are stored in (from its header alone)."""
    with Path(path).open("rb") as handle:
        header, _ = read_header(handle)
    found = set()
    for entry in header.values():
        stored = _DTYPES.get(entry.get("dtype")) if isinstance(entry, dict) else None
        if stored is not None and stored.is_floating_point:
            found.add(stored)
    return found


def _begin(entry) -> int:
    try:
        return int(entry["data_offsets"][0])
    except (KeyError, TypeError, ValueError, IndexError):
        return -1
