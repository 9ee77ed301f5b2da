"""Weights go from the safetensors files straight into the compute dtype: every part arrives in
the dtype it runs in, equal to the file's values cast once, and loading never holds a second
copy of the model (checked by the peak RSS of a child process loading a 140 MB UNet)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import TINY_BASE, TINY_PASD
from safetensors.torch import load_file, save_file

from pasd_cli.engine.loading import load_components, model_dtypes
from pasd_cli.errors import ModelError
from pasd_cli.nn.loading import WEIGHTS_NAME, build_pasd_unet, load_pasd_unet
from pasd_cli.nn.tensor_file import read_tensors


def test_read_tensors_equals_safetensors_own_reader_cast_once(tmp_path):
    generator = torch.Generator().manual_seed(0)
    state = {
        "a.weight": torch.randn(7, 5, generator=generator).half(),
        "b.weight": torch.randn(3, 2, 2, generator=generator).bfloat16(),
        "c.full": torch.randn(4, generator=generator),
        "d.index": torch.arange(6).reshape(2, 3),
        "e.mask": torch.tensor([True, False, True]),
        "f.empty": torch.zeros(0, 3),
    }
    path = tmp_path / "w.safetensors"
    save_file(state, str(path), metadata={"format": "pt"})
    stored = load_file(str(path))
    as_stored = read_tensors(path)
    assert as_stored.keys() == stored.keys()
    for key, value in stored.items():
        assert as_stored[key].dtype == value.dtype and torch.equal(as_stored[key], value), key
    cast = read_tensors(path, torch.bfloat16)
    for key, value in stored.items():
        expected = value.to(torch.bfloat16) if value.is_floating_point() else value
        assert cast[key].dtype == expected.dtype and torch.equal(cast[key], expected), key


def test_a_damaged_file_is_a_model_error_naming_it(tmp_path):
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text((TINY_PASD / "unet" / "config.json").read_text())
    data = (TINY_PASD / "unet" / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="cannot read .*diffusion_pytorch_model.safetensors: "):
        load_pasd_unet(folder)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_components_arrive_in_the_compute_dtype(dtype):
    components = load_components(TINY_PASD, TINY_BASE, dtype)
    for model in (components.unet, components.controlnet, components.text_encoder):
        assert {p.dtype for p in model.parameters()} == {dtype}, type(model).__name__
    _, vae_dtype = model_dtypes(dtype, components.vae)
    assert {p.dtype for p in components.vae.parameters()} == {vae_dtype}
    # The values are the file's, cast once.
    stored = load_file(str(TINY_PASD / "unet" / WEIGHTS_NAME))
    unet = components.unet.state_dict()
    assert all(torch.equal(unet[k], v.to(dtype)) for k, v in stored.items())


_CHILD = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    import psutil
    from pasd_cli.cli.runtime import peak_rss
    from pasd_cli.nn.loading import load_pasd_unet
    dtype, keep = getattr(torch, sys.argv[3]), {torch.float16} if sys.argv[4] == "keep" else set()
    load_pasd_unet(Path(sys.argv[2]), dtype)  # imports everything the load needs
    Path("/proc/self/clear_refs").write_text("5")  # the peak RSS starts again from the current RSS
    before = psutil.Process().memory_info().rss
    unet = load_pasd_unet(Path(sys.argv[1]), dtype, keep, mapped=bool(keep))
    peak = peak_rss()
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    print(peak - before, weights)
    """
)


def _load_growth(folder: Path, dtype: str = "bfloat16", keep: bool = False) -> tuple[int, int]:
    """(RSS growth while loading `folder` in `dtype`, the loaded weights' bytes), in a child;
    `keep`: float16 weights kept as stored, mapped."""
    args = [sys.executable, "-c", _CHILD, str(folder), str(TINY_PASD / "unet"), dtype, "keep" if keep else "-"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, check=True)
    grown, weights = map(int, proc.stdout.split())
    return grown, weights


@pytest.fixture(scope="module")
def unet_140mb(tmp_path_factory) -> Path:
    """A float16 UNet file of 140 MB."""
    config = json.loads((TINY_PASD / "unet" / "config.json").read_text())
    config.update(block_out_channels=[128, 256, 256, 256], cross_attention_dim=256)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_pasd_unet(config, "full").state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=generator).half() for k, shape in shapes.items()}
    folder = tmp_path_factory.mktemp("big") / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state, str(folder / WEIGHTS_NAME))
    return folder


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resets the peak RSS through /proc")
def test_loading_peaks_at_the_weights_in_the_compute_dtype(unet_140mb):
    """A float16 file loaded in bfloat16: neither the file's tensors as a whole nor a float32
    copy may be alive beside the result (either would double the peak)."""
    folder = unet_140mb
    # The smaller of two loads: a second copy of the weights shows in both, while the allocator's
    # noise on a busy machine (seen once in a full suite: 3x) does not repeat.
    grown, weights = min(_load_growth(folder) for _ in range(2))
    assert weights > 100 * 2**20  # big enough for the peak to be measured
    # Measured: 1.0x the weights (2.0x before, with the whole file read, then cast); a second copy
    # of the weights, in any dtype, makes it 2x.
    assert grown <= 1.5 * weights, (grown / 2**20, weights / 2**20)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resets the peak RSS through /proc")
def test_weights_kept_as_stored_are_mapped_not_read(unet_140mb):
    """Kept float16 for float32 compute (engine/half_weights.py), the weights are the file's pages:
    loading touches almost none of them (a read would grow the RSS by the weights)."""
    grown, weights = _load_growth(unet_140mb, "float32", keep=True)  # a read would be 5x the bound
    assert weights > 100 * 2**20
    assert grown <= 0.2 * weights, (grown / 2**20, weights / 2**20)


def test_a_mapped_tensor_written_in_place_leaves_the_file_as_it_was(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float16)}, str(path))
    before = path.read_bytes()
    mapped = read_tensors(path, torch.float32, keep={torch.float16}, mapped=True)["a"]
    assert torch.equal(mapped, torch.arange(6, dtype=torch.float16))
    mapped.add_(1)  # a merge into the weights
    assert path.read_bytes() == before
    assert torch.equal(read_tensors(path)["a"], torch.arange(6, dtype=torch.float16))


def mapped_file(tensor: torch.Tensor) -> str:
    """The file whose mapping holds the tensor's memory ("" for the allocator's memory), from
    /proc/self/maps."""
    address = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(n, 16) for n in fields[0].split("-"))
            if start <= address < end:
                name = fields[5].strip() if len(fields) == 6 else ""
                return name if name.startswith("/") else ""  # not "[heap]" and the like
    raise AssertionError(f"{address:#x} is in no mapping")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_only_tensors_kept_in_half_precision_are_mapped(tmp_path):
    """A float32 tensor used as stored is read into the allocator's memory: computed on at the
    file's alignment, the matrix kernels' sums would differ in the last bit from a read load's."""
    path = tmp_path / "w.safetensors"
    save_file({"half": torch.ones(4, dtype=torch.float16), "full": torch.ones(4)}, str(path))
    state = read_tensors(path, torch.float32, keep={torch.float16}, mapped=True)
    assert mapped_file(state["half"]) == str(path) and mapped_file(state["full"]) == ""
    assert state["full"].dtype == torch.float32 and state["half"].dtype == torch.float16
