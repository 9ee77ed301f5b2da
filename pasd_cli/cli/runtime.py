"""The CLI's choice of device and dtype. The engine never guesses; it is told."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import DeviceError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda", "mps")  # and "cuda:N"
DTYPES = ("auto", "fp32", "fp16", "bf16")
# engine.settings.EXACT_DTYPE as --dtype names it.
EXACT_DTYPE_OPTION = "fp32"
# CPU flags (Linux /proc/cpuinfo) of native bf16 matrix instructions: AVX512-BF16 and AMX.
BF16_MATRIX_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# Without --vae-memory, a VAE pass may use this share of the device's free memory (measured once
# the models are loaded); the rest is headroom for the diffusion and other programs.
VAE_MEMORY_SHARE = 0.5


@dataclass(frozen=True)
class Runtime:
    """Where the models run: a torch device and dtype."""

    device: Any
    dtype: Any
    # Weights stored in 16 bits stay so and are widened per layer (engine/half_weights.py).
    half_weights: bool = False
    # Where weights converted to a half dtype at load are kept for later loads to map
    # (nn/converted_weights.ConvertedWeights); None: converted at every load.
    converted: Any = None

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    @property
    def label(self) -> str:
        """ "cuda (float16)", for messages."""
        return f"{self.device} ({self.dtype_name})"


def pick_runtime(
    device: str, dtype: str, local_rank: int | None = None, exact: bool = False, compile: bool = False
) -> Runtime:
    """The device and dtype for --device and --dtype (one of DEVICES or cuda:N, one of DTYPES).
    `local_rank`: this worker's GPU on its machine under torchrun, where CUDA means that one.
    `exact`: --exact, which loads the weights as the released code does; `compile`: --compile."""
    limit_heap_fragmentation()
    chosen = pick_device(device, local_rank)
    precision = pick_dtype(dtype, chosen)
    use_true_fp32(chosen, precision)
    return Runtime(chosen, precision, keeps_half_weights(precision, exact, compile))


def keeps_half_weights(dtype: torch.dtype, exact: bool = False, compile: bool = False) -> bool:
    """Computing in float32, weights that the files store in 16 bits stay 16-bit and are widened
    per layer as it runs: the same numbers, so the same output, in half the weights' memory and a
    load with no conversion. --exact keeps the released loading (float32 copies of everything),
    and so does --compile: the widening swaps each layer's tensors around its forward, which a
    compiled graph would not see."""
    import torch

    return dtype == torch.float32 and not exact and not compile


def pick_device(name: str, local_rank: int | None = None) -> torch.device:
    """`name` is one of DEVICES or cuda:N (the option parser checks it). CUDA without an index
    is the worker's GPU (`local_rank`) when a launcher started several."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return pick_device("cuda", local_rank)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(
            "CUDA was asked for but torch sees no CUDA device",
            hint="use --device cpu, or install a CUDA build of torch",
        )
    if name == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("MPS was asked for but this machine or torch build has no MPS")
    if name == "cuda" and local_rank is not None:
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(
            f"{device} was asked for but torch sees {torch.cuda.device_count()} CUDA device(s)",
            hint="number GPUs from 0; CUDA_VISIBLE_DEVICES renumbers the ones it keeps",
        )
    return device


def pick_dtype(name: str, device: torch.device, cpu_bf16: bool | None = None) -> torch.dtype:
    """auto: float16 on GPUs, as released; on the CPU, where float16 is slow, bfloat16 where it
    has bf16 matrix instructions (`cpu_bf16`, default: `cpu_has_bf16_matrix()`; measured 1.5x
    faster at 0.6x the memory), else float32. `name` is one of DTYPES (the option parser checks it)."""
    import torch

    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name == "auto":
        if device.type != "cpu":
            return torch.float16
        if cpu_bf16 is None:
            cpu_bf16 = cpu_has_bf16_matrix()
        return torch.bfloat16 if cpu_bf16 else torch.float32
    if name == "bf16" and device.type == "mps" and not torch.backends.mps.is_macos_or_newer(14, 0):
        raise DeviceError("bf16 on MPS needs macOS 14 or newer; use --dtype fp16")
    return table[name]


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The flags of /proc/cpuinfo's text (the first "flags" line: every core has the same)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def cpu_has_bf16_matrix(cpuinfo_path: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX), so that oneDNN's
    matmuls and convolutions run bf16 faster than fp32 rather than emulating it. Read from the
    CPU's flags, not torch.backends.cpu.get_cpu_capability(): that names ATen's vector level
    (AVX512 says nothing of bf16), while oneDNN picks its kernels from the flags. Without
    /proc/cpuinfo (macOS, Windows): no, and fp32 stays the choice."""
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as file:
            return bool(cpu_flags(file.read()) & BF16_MATRIX_FLAGS)
    except OSError:
        return False


def use_true_fp32(device: torch.device, dtype: torch.dtype) -> None:
    """fp32 asked for on CUDA means IEEE fp32: torch lets cuDNN convolutions run in TF32 by
    default (10-bit mantissa), which would make `--dtype fp32` differ from the released model's
    fp32 results well beyond rounding.

    Set for every cuDNN op (convolutions and RNNs) and for matmuls. torch 2.9 added a precision
    API beside the legacy flags and keeps both: the legacy cuDNN flag's getter, which
    torch.compile reads, raises when that flag disagrees with the new per-op values. So the
    legacy flags are set first (on torch 2.9+ that clears the per-op values), then, where it
    exists, the new API to the same IEEE precision: both views agree on every torch."""
    import torch

    if device.type != "cuda" or dtype != torch.float32:
        return
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    if hasattr(torch.backends.cudnn, "fp32_precision"):  # torch 2.9+
        torch.backends.cudnn.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float16 -> "float16", for messages and records."""
    return str(dtype).removeprefix("torch.")


def memory_budget(device: torch.device) -> int:
    """Bytes a VAE pass may use on `device`: a share of what is free now (call it after the
    models are loaded). The allocator's cached blocks are handed back first: the device counts
    them as used, though the pass could reuse them. Per-tensor limits are the engine's concern
    (engine.limits), applied when it chooses tiles within this budget."""
    import psutil
    import torch

    share = VAE_MEMORY_SHARE
    if device.type == "cuda":
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * share)
    if device.type == "mps":
        torch.mps.empty_cache()
        # Unified memory: the system and every other program share it with the GPU, and macOS
        # swaps rather than refusing, so a pass takes half the usual share of what Metal
        # recommends and the driver has not yet handed out.
        free = torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
        return int(max(0, free) * share / 2)
    return int(psutil.virtual_memory().available * share)


# glibc's mallopt parameters, and the thresholds the command line sets with them.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
GLIBC_TRIM_THRESHOLD = 128 << 10  # glibc's default
HEAP_MMAP_THRESHOLD = 4 << 20
# While denoising: every step's tensors in the heap (an SD-size step at 64 latents widens
# convolution weights of up to 59 MB), and up to this much free memory kept at its top.
DENOISE_MMAP_THRESHOLD = 64 << 20
DENOISE_TRIM_THRESHOLD = 256 << 20


@functools.cache
def _libc() -> Any:
    """glibc, or None where the C library is another (macOS, musl) and there is nothing to tune."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except (OSError, AttributeError):
        return None


def limit_heap_fragmentation() -> None:
    """Have glibc return large freed blocks to the system at once.

    Tiled passes allocate and free many same-sized tensors of a few MB; glibc's adaptive
    threshold moves those from mmap into its heap, where they fragment and keep the process's
    resident memory growing well past what is live (measured: 0.9 GB instead of 0.2 GB for a
    tiled 2K encode). A fixed threshold keeps resident memory at the live size; the trim
    threshold is glibc's default, which its adaptive rule would otherwise have raised too."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, GLIBC_TRIM_THRESHOLD)


class _ComputeHeap:
    """glibc's heap around denoising loops and untiled VAE encodes on the CPU
    (PASDPipeline.compute_scope).

    Each step allocates and frees the same tensors, as each strip of a VAE pass does. Mapped one
    by one above the 4 MB threshold, every one is fresh memory whose pages the kernel zeroes on
    first touch: 9-10 s of system CPU in an SD-size step of about 58 CPU seconds at 512 px (2
    cores). Inside a loop the threshold is raised, so that the heap keeps freed blocks and the
    next step reuses them (0.1-1.5 s). Afterwards the threshold returns and the heap hands its
    free pages back. SD's VAE encoding 512x512 in strips took 0.7x its time so (the decode too,
    but its peak, a run's, rose 0.13 GB: it stays outside).

    The heap keeps the address range the loop grew it to, though: blocks allocated during the
    steps that live on (the latents, libraries' caches) pin it. Later small allocations march
    through that range (glibc splits each from the last remainder), touching fresh pages that
    only a trim hands back: measured, 0.1-0.2 GB more at the VAE decode's peak. So outside the
    loops a thread trims the heap every TRIM_EVERY seconds, which keeps the whole run's peak
    where it was without the loop's heap (benchmarks/bench_speed.py: 4.16 GB against 4.17 GB).
    Each trim hands back freed pages that the next allocations fault in again: five times a
    second cost 5% on small in-process work (the test suite's), once a second about 1%."""

    TRIM_EVERY = 1.0

    def __init__(self, libc: Any):
        self.libc = libc
        self.lock = threading.Lock()
        self.loops = 0  # denoising loops running now
        self.trimmer: threading.Thread | None = None
        self.stopped = threading.Event()

    @contextmanager
    def reused(self) -> Iterator[None]:
        with self.lock:
            self.loops += 1
            self.libc.mallopt(_M_TRIM_THRESHOLD, DENOISE_TRIM_THRESHOLD)
            self.libc.mallopt(_M_MMAP_THRESHOLD, DENOISE_MMAP_THRESHOLD)
        try:
            yield
        finally:
            with self.lock:
                self.loops -= 1
                if not self.loops:
                    self.libc.mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)
                    self.libc.mallopt(_M_TRIM_THRESHOLD, GLIBC_TRIM_THRESHOLD)
                    self.libc.malloc_trim(0)
                if self.trimmer is None:
                    self.trimmer = threading.Thread(target=self._trim, name="pasd-heap-trim", daemon=True)
                    self.trimmer.start()

    def _trim(self) -> None:
        while not self.stopped.wait(self.TRIM_EVERY):
            with self.lock:
                if not self.loops:
                    self.libc.malloc_trim(0)


_heap: _ComputeHeap | None = None


def stop_heap_trimming() -> None:
    """Stops the trimming thread, for a process that ran the command line in-process and goes on
    with other work (its tests); the next denoising loop starts another."""
    global _heap
    heap, _heap = _heap, None
    if heap is not None:
        heap.stopped.set()
        if heap.trimmer is not None:
            heap.trimmer.join()


@contextmanager
def heap_reused_while_computing() -> Iterator[None]:
    """A denoising loop or an untiled VAE encode in glibc's heap (see _ComputeHeap); nothing
    elsewhere."""
    global _heap
    libc = _libc()
    if libc is None:
        yield
        return
    if _heap is None:
        _heap = _ComputeHeap(libc)
    with _heap.reused():
        yield


class PeakMemory:
    """The peak memory of one image, for its record: on CUDA the peak allocated by torch on the
    device; elsewhere the process's peak resident memory (RSS), restarted per image where the
    system allows it (Linux), else the process's peak so far."""

    def __init__(self, device: torch.device):
        self.device = device

    @property
    def kind(self) -> str:
        return "cuda_allocated" if self.device.type == "cuda" else "rss"

    def start(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # restarts the kernel's peak RSS (VmHWM) at the current RSS
        except OSError:
            pass

    def peak(self) -> int:
        """Bytes."""
        import torch

        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return peak_rss()


def peak_rss() -> int:
    """The process's peak resident memory in bytes since it started or since the last reset.
    Linux: VmHWM, the peak of this process's own memory. Not ru_maxrss: that never reads below the
    RSS that the parent had when it forked this process (the kernel carries the forked copy's peak
    over the exec), so under a large parent (a test runner, a launcher) it reports the parent's
    size (measured: a child of a 1.5 GB parent read 1.5 GB, its VmHWM 13 MB)."""
    import resource
    import sys

    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB elsewhere
