"""Speed and memory of PASD at Stable Diffusion 1.5 size, each configuration against the exact mode.

    python benchmarks/bench_speed.py                      # CPU: 256x256 input, x2, process size 512
    python benchmarks/bench_speed.py --device cuda        # GPU (benchmarks/gpu_check.sh runs this)
    python benchmarks/bench_speed.py --configs exact,fast --repeat 2 --json out.json

The models are the SD-1.5-size architecture (PASD UNet with full PACA, ControlNet, VAE, CLIP text
encoder, and an LCM-LoRA of rank 64 for --fast) with random weights, made once and written as
float16 safetensors in the released folder layout (`--models`, default ~/.cache/pasd-bench), so
loading goes through the real path. Random weights cost what trained ones cost; their images
mean nothing, but their deviation between configurations is still a deviation.

Each configuration runs in a child process of its own, so its peak memory is its own, and the
configurations alternate when repeated (medians are shown). Per configuration:
- load: reading the weights into the networks on the device (imports apart, those the engine
  makes lazily on its first load included), its peak RSS, and the networks' weights in their
  dtypes; `to first step`: load, prompt and VAE encode. Weights converted to a half dtype are
  kept converted, as the command line keeps them in its model store (nn/converted_weights.py):
  a first load per configuration, before the rounds, converts them and has a thread write the
  copies (`first load`; the writing, timed apart, overlaps a run's first image), and the timed
  runs map them, as a user's later runs do;
- s/step (denoising steps, measured), VAE encode and decode seconds, the run's total;
- `total at N steps`: load + prompt + encode + N x s/step + decode with each configuration's own
  step count (the default's 20, --fast's 4), projected from the measured steps;
- peak RSS of the whole child, and per stage (prompts and VAE encode, the denoising steps, the
  decode), CUDA: torch.cuda.max_memory_allocated too;
- UNet evaluations (samples through the UNet, counted by a forward hook) and TFLOPs;
- the output's deviation from the baseline's, in 8-bit levels (mean, max).
Ratios are to the baseline column (`--baseline`, the exact mode), measured in the same run.

FLOPs are counted with torch.utils.flop_counter.FlopCounterMode on the same architecture built on
the meta device (no memory, no compute): one denoiser pass per distinct tile shape, the VAE
encode and decode of the whole image (untiled; tiling repeats only the halos) and the prompts,
multiplied out by the steps, tiles and CFG the configuration runs. They are also given, without
times, for outputs of 1K, 2K and 4K pixels a side at each configuration's own step count.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_BASE = ROOT / "tests" / "fixtures" / "reference" / "tiny-pasd" / "stable-diffusion-v1-5"
SD15_CONFIGS = ROOT / "tests" / "fixtures" / "sd15"
ENGINE_CONFIGS = ROOT / "pasd_cli" / "engine" / "configs" / "sd15"
WEIGHTS = "diffusion_pytorch_model.safetensors"
# Bump when the models written change, so an old cache is rebuilt.
MODELS_VERSION = "1"
LCM_RANK = 64
PROMPT = "a photo of a harbour at dusk"


@dataclass(frozen=True)
class Config:
    """One column: how the CLI would be called, and what that means for the engine."""

    name: str
    flags: str
    dtype: str = "fp32"  # fp32, fp16, bf16 or auto (the CLI's rule for the device)
    fast: bool = False
    settings: dict = field(default_factory=dict)
    real_steps: int = 20  # the configuration's own step count, for the projected total and FLOPs
    compile: bool = False
    # The command line's heap for the denoising loop on the CPU (cli/runtime.py); without it, the
    # steps' tensors are mapped and zeroed afresh each time, as before that existed.
    heap_reuse: bool = True


def configs() -> dict[str, Config]:
    import dataclasses

    from pasd_cli.engine import FAST_GUIDANCE, FAST_STEPS, UpscaleSettings

    fast = {"steps": FAST_STEPS, "guidance": FAST_GUIDANCE}
    # --exact, where the settings have it (the released computation); before, the defaults were it.
    exact = {"exact": True} if "exact" in {f.name for f in dataclasses.fields(UpscaleSettings)} else {}
    return {
        c.name: c
        for c in (
            Config("exact", "--exact" if exact else "--dtype fp32 (today's defaults)", "fp32", settings=exact),
            Config("default", "(no flags)", "auto"),
            Config("bf16", "--dtype bf16", "bf16"),
            Config("fp16", "--dtype fp16", "fp16"),
            Config("fast", "--fast", "auto", fast=True, settings=fast, real_steps=FAST_STEPS),
            Config("fast-bf16", "--fast --dtype bf16", "bf16", fast=True, settings=fast, real_steps=FAST_STEPS),
            Config("compile", "--compile", "auto", compile=True),
            Config("default-mapped", "(no flags), steps not in the heap (before)", "auto", heap_reuse=False),
            Config("exact-mapped", "--exact, steps not in the heap (before)", "fp32", settings=exact, heap_reuse=False),
        )
    }


# ---------------------------------------------------------------------------------- the models


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _save_half(model, folder: Path, config: dict) -> None:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    state = {k: v.to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})


def _lcm_lora(unet, rank: int):
    """A kohya-layout LoRA on every attention projection and resnet conv of the stock UNet, as
    the LCM-LoRA for SD 1.5 covers; small random factors (its effect is not the point)."""
    import torch

    from pasd_cli.engine.bases import stock_unet_keys

    generator = torch.Generator().manual_seed(5)
    stock = set(stock_unet_keys(unet))
    state = {}
    targets = (".to_q", ".to_k", ".to_v", ".to_out.0", ".proj_in", ".proj_out", ".ff.net.2", ".conv1", ".conv2")
    for name, module in unet.named_modules():
        if not name.endswith(targets) or f"{name}.weight" not in stock:
            continue
        weight = module.weight
        out_features, in_features = weight.shape[:2]
        kernel = tuple(weight.shape[2:])
        key = "lora_unet_" + name.replace(".", "_")
        state[f"{key}.lora_down.weight"] = (
            torch.randn((rank, in_features, *kernel), generator=generator) * 0.01
        ).half()
        state[f"{key}.lora_up.weight"] = (
            torch.randn((out_features, rank, *((1,) * len(kernel))), generator=generator) * 0.01
        ).half()
        state[f"{key}.alpha"] = torch.tensor(float(rank // 8))
    return state


def ensure_models(folder: Path) -> dict[str, Path]:
    """The SD-size models under `folder`, written on first use (a minute or two, ~2.5 GB)."""
    paths = {
        "pasd": folder / "pasd" / "checkpoint-100000",
        "base": folder / "stable-diffusion-v1-5",
        "lcm": folder / "lcm-lora-sdv1-5" / "pytorch_lora_weights.safetensors",
    }
    marker = folder / "READY"
    if marker.is_file() and marker.read_text() == MODELS_VERSION:
        return paths
    import shutil

    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from pasd_cli.nn.loading import build_pasd_controlnet, build_pasd_unet

    print(f"writing SD-size random models to {folder} (once)", file=sys.stderr, flush=True)
    torch.manual_seed(0)
    unet_config = _read_json(SD15_CONFIGS / "unet_config.json")
    unet = build_pasd_unet(unet_config, "full")
    _save_half(unet, paths["pasd"] / "unet", unet_config)
    paths["lcm"].parent.mkdir(parents=True, exist_ok=True)
    save_file(_lcm_lora(unet, LCM_RANK), str(paths["lcm"]))
    del unet
    controlnet_config = _read_json(SD15_CONFIGS / "controlnet_config.json")
    _save_half(build_pasd_controlnet(controlnet_config, 0), paths["pasd"] / "controlnet", controlnet_config)
    base = paths["base"]
    vae = AutoencoderKL.from_config(_read_json(ENGINE_CONFIGS / "vae.json"))
    vae.to(torch.float16).save_pretrained(str(base / "vae"))
    text_config = {k: v for k, v in _read_json(ENGINE_CONFIGS / "text_encoder.json").items() if k != "torch_dtype"}
    CLIPTextModel(CLIPTextConfig(**text_config)).to(torch.float16).save_pretrained(str(base / "text_encoder"))
    for part in ("tokenizer", "scheduler"):  # the tiny tokenizer's ids fit SD's vocabulary
        shutil.copytree(TINY_BASE / part, base / part, dirs_exist_ok=True)
    shutil.copy(TINY_BASE / "model_index.json", base / "model_index.json")
    marker.write_text(MODELS_VERSION)
    return paths


def lr_image(side: int):
    """A smooth colour gradient with a soft texture."""
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:side, 0:side] / side
    texture = 0.08 * np.sin(40 * xx) * np.sin(33 * yy)
    rgb = np.stack([xx, yy, 0.5 * (xx + yy)], -1) * 0.8 + 0.1 + texture[..., None]
    return Image.fromarray((rgb.clip(0, 1) * 255).astype(np.uint8))


# ---------------------------------------------------------------------------------- one run


def _reset_peak_rss() -> bool:
    """Linux: the peak RSS (VmHWM, ru_maxrss) starts again from the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    from pasd_cli.cli.runtime import peak_rss

    return peak_rss()


def settings_for(config: Config, args: dict):
    from pasd_cli.engine import UpscaleSettings

    values = {
        "steps": args["steps"],
        "scale": args["scale"],
        "process_size": args["process_size"],
        "prompt": PROMPT,
        "seed": 0,
        **config.settings,
    }
    return UpscaleSettings(**values)


def _import_the_loaders() -> None:
    """What `load_pipeline` imports on its first call (the engine imports lazily, so that the
    command line's dry runs load no torch): counted with the imports, so that `load` is loading."""
    import diffusers.hooks.layerwise_casting  # noqa: F401
    from diffusers import AutoencoderKL, LCMScheduler, UniPCMultistepScheduler  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    import pasd_cli.engine.loading  # noqa: F401
    import pasd_cli.engine.pipeline  # noqa: F401
    import pasd_cli.engine.stylize  # noqa: F401


def child(name: str, args: dict) -> dict:
    start = time.perf_counter()
    import torch

    from pasd_cli.cli.runtime import (
        heap_reused_while_computing,
        keeps_half_weights,
        limit_heap_fragmentation,
        memory_budget,
        pick_dtype,
        use_true_fp32,
    )
    from pasd_cli.engine import load_pipeline

    _import_the_loaders()
    limit_heap_fragmentation()  # as the CLI does
    config = configs()[name]
    device = torch.device(args["device"])
    dtype = pick_dtype(config.dtype, device)
    use_true_fp32(device, dtype)
    models = {k: Path(v) for k, v in args["models"].items()}
    imports = time.perf_counter() - start
    cuda = device.type == "cuda"

    from pasd_cli.engine import ConvertedWeights

    # As the command line keeps them: in the model store, written in the background.
    copies = ConvertedWeights(Path(args["converted"]), background=True)
    _reset_peak_rss()
    rss_before_load = _peak_rss()
    load_start, load_cpu = time.perf_counter(), time.process_time()
    pipeline = load_pipeline(
        models["pasd"],
        models["base"],
        device,
        dtype,
        lcm_lora=models["lcm"] if config.fast else None,
        # As the command line decides it (cli/runtime.py).
        keep_half_weights=keeps_half_weights(dtype, exact=bool(config.settings.get("exact")), compile=config.compile),
        converted=copies,
        bf16_vae=config.fast,  # as --fast has it
    )
    # As the command line does: NHWC on CUDA, --compile.
    pipeline.optimize(channels_last=cuda, compile=config.compile)
    if cuda:
        torch.cuda.synchronize()
    load = time.perf_counter() - load_start
    load_cpu = time.process_time() - load_cpu
    load_peak_rss = _peak_rss()
    load_cuda_peak = torch.cuda.max_memory_allocated() if cuda else None
    if args.get("load_only"):
        copies.wait()  # the copies' writing goes on while a run's first image is made
        return {
            "config": name,
            "load_s": load,
            "load_cpu_s": load_cpu,
            "load_peak_rss": load_peak_rss,
            "copies_written_s": time.perf_counter() - load_start - load,
            "copies_gb": sum(p.stat().st_size for p in copies.written) / 1e9,
        }
    weights = sum(
        p.numel() * p.element_size()
        for model in (pipeline.unet, pipeline.controlnet, pipeline.text_encoder, pipeline.vae.vae)
        for p in model.parameters()
    )
    pipeline.memory_budget = memory_budget(device)
    if device.type == "cpu" and config.heap_reuse:  # as the command line does
        pipeline.compute_scope = heap_reused_while_computing
    settings = settings_for(config, args)

    evaluations = [0]

    def count(module, inputs, kwargs):
        sample = inputs[0] if inputs else kwargs["sample"]
        evaluations[0] += sample.shape[0]

    pipeline.unet.register_forward_pre_hook(count, with_kwargs=True)
    marks: dict[str, list[float]] = {}
    cpu_marks: dict[str, list[float]] = {}

    # Peak RSS per stage (CPU, Linux): read and restarted at each stage's end. A stage ends at the
    # first mark after it: prompts and encode at the initial latents, the steps at the last one.
    stage_ends = {"initial_latents": "encode", "latents_after_step": "steps", "decoded": "decode"}
    stage_peaks: dict[str, int] = {}
    resettable = not cuda and _reset_peak_rss()

    def trace(mark: str, value) -> None:
        if mark in ("prompt_embeds", "initial_latents", "latents_after_step", "decoded"):
            if cuda:
                torch.cuda.synchronize()
            marks.setdefault(mark, []).append(time.perf_counter())
            cpu_marks.setdefault(mark, []).append(time.process_time())
        if resettable and mark in stage_ends:
            stage = stage_ends[mark]
            stage_peaks[stage] = max(stage_peaks.get(stage, 0), _peak_rss())
            _reset_peak_rss()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    run_start, run_cpu = time.perf_counter(), time.process_time()
    result = pipeline.upscale(lr_image(args["input_size"]), settings, trace=trace)
    run = time.perf_counter() - run_start
    run_cpu = time.process_time() - run_cpu
    copies.wait()
    after_steps = cpu_marks["latents_after_step"]
    cpu_steps = [b - a for a, b in zip([cpu_marks["initial_latents"][0], *after_steps], after_steps)]
    steps = [
        b - a for a, b in zip([marks["initial_latents"][0], *marks["latents_after_step"]], marks["latents_after_step"])
    ]
    out = Path(args["out"]) / f"{name}.png"
    result.image.save(out)
    return {
        "config": name,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch.") + (" (16-bit weights kept)" if pipeline.half_weights else ""),
        "made_in": str(result.dtype).removeprefix("torch."),
        "imports_s": imports,
        "load_s": load,
        "to_first_step_s": load + marks["initial_latents"][0] - run_start,
        "prompt_s": marks["prompt_embeds"][0] - run_start,
        "encode_s": marks["initial_latents"][0] - marks["prompt_embeds"][0],
        # The first step warms up (oneDNN primitives, CUDA kernels, compilation): apart.
        "first_step_s": steps[0],
        "step_s": statistics.mean(steps[1:] or steps),
        "steps": len(steps),
        "decode_s": marks["decoded"][0] - marks["latents_after_step"][-1],
        "run_s": run,
        "total_s": load + run,
        # CPU seconds of the process (all threads): steadier than wall time on a shared machine.
        "load_cpu_s": load_cpu,
        "step_cpu_s": statistics.mean(cpu_steps[1:] or cpu_steps),
        "total_cpu_s": load_cpu + run_cpu,
        "weights_bytes": weights,
        "rss_before_load": rss_before_load,
        "load_peak_rss": load_peak_rss,
        # Restarted per stage: the whole run's peak is the largest (the load's included).
        "peak_rss": max(load_peak_rss, _peak_rss(), *stage_peaks.values()),
        **{f"{stage}_peak_rss": peak for stage, peak in stage_peaks.items()},
        "load_cuda_peak": load_cuda_peak,
        "cuda_peak": torch.cuda.max_memory_allocated() if cuda else None,
        "unet_evaluations": evaluations[0],
        "latent_tiles": result.latent_tiles,
        "output": str(out),
        "size": list(result.image.size),
    }


# ---------------------------------------------------------------------------------- FLOPs


class FlopCensus:
    """FLOPs of the SD-size networks on the meta device, per call shape, cached."""

    def __init__(self):
        import torch
        from diffusers import AutoencoderKL
        from transformers import CLIPTextConfig, CLIPTextModel

        from pasd_cli.nn.loading import build_pasd_controlnet, build_pasd_unet

        with torch.device("meta"):
            self.unet = build_pasd_unet(_read_json(SD15_CONFIGS / "unet_config.json"), "full").eval()
            self.controlnet = build_pasd_controlnet(_read_json(SD15_CONFIGS / "controlnet_config.json"), 0).eval()
            self.vae = AutoencoderKL.from_config(_read_json(ENGINE_CONFIGS / "vae.json")).eval()
            text_config = {
                k: v for k, v in _read_json(ENGINE_CONFIGS / "text_encoder.json").items() if k != "torch_dtype"
            }
            self.text_encoder = CLIPTextModel(CLIPTextConfig(**text_config)).eval()
        self._cache: dict[tuple, int] = {}

    @staticmethod
    def _count(run) -> int:
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            run()
        return counter.get_total_flops()

    def denoiser(self, batch: int, height: int, width: int) -> int:
        """ControlNet + UNet on `batch` latents of height x width (DRM embedding apart)."""
        key = ("denoiser", batch, height, width)
        if key not in self._cache:
            import torch

            from pasd_cli.nn.controlnet import EmbeddedHint

            def run():
                sample = torch.empty(batch, 4, height, width, device="meta")
                text = torch.empty(batch, 77, 768, device="meta")
                t = torch.tensor(500, device="meta")
                embedding = self.controlnet.embed_hint(
                    torch.empty(1, 3, height * 8, width * 8, device="meta")
                ).embedding
                down, mid = self.controlnet(
                    sample,
                    t,
                    encoder_hidden_states=text,
                    controlnet_cond=EmbeddedHint(embedding.repeat(batch, 1, 1, 1)),
                    return_dict=False,
                )
                self.unet(sample, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid)

            self._cache[key] = self._count(run) - self.hint_embedding(height, width) * 1
        return self._cache[key]

    def hint_embedding(self, height: int, width: int) -> int:
        key = ("hint", height, width)
        if key not in self._cache:
            import torch

            self._cache[key] = self._count(
                lambda: self.controlnet.embed_hint(torch.empty(1, 3, height * 8, width * 8, device="meta"))
            )
        return self._cache[key]

    def vae_pass(self, what: str, height: int, width: int, window: int = 0) -> int:
        key = (what, height, width, window)
        if key not in self._cache:
            import torch

            from pasd_cli.engine import vae_attention

            vae_attention.install(self.vae, window)
            if what == "encode":
                self._cache[key] = self._count(lambda: self.vae.encode(torch.empty(1, 3, height, width, device="meta")))
            else:
                self._cache[key] = self._count(
                    lambda: self.vae.decode(torch.empty(1, 4, height // 8, width // 8, device="meta"))
                )
        return self._cache[key]

    def prompts(self, cfg: bool) -> int:
        key = ("text", cfg)
        if key not in self._cache:
            import torch

            ids = torch.zeros(2 if cfg else 1, 77, dtype=torch.long, device="meta")
            self._cache[key] = self._count(lambda: self.text_encoder(ids))
        return self._cache[key]

    def image(self, settings, height: int, width: int, steps: int, device: str = "cpu") -> dict[str, int]:
        """FLOPs of one image whose hint is height x width pixels, as the pipeline runs it."""
        from pasd_cli.engine.tiling import TileGrid, needs_tiling

        latent_h, latent_w = height // 8, width // 8
        copies = 2 if settings.uses_cfg else 1
        tile, overlap = latent_tiling(settings, latent_h, latent_w)
        if needs_tiling(latent_h, latent_w, tile):
            tiles = [(t.slices()[0], t.slices()[1]) for t in TileGrid.build(latent_h, latent_w, tile, overlap).tiles]
            shapes = [(rows.stop - rows.start, cols.stop - cols.start) for rows, cols in tiles]
        else:
            shapes = [(latent_h, latent_w)]
        window = vae_window(settings, self.vae.config, latent_h, latent_w, device)
        per_step = 0
        per_pass = settings.tile_batch or 1  # batches group the tiles; FLOPs stay per tile
        for first in range(0, len(shapes), per_pass):
            batch = shapes[first : first + per_pass]
            h, w = batch[0]
            per_step += self.denoiser(copies * len(batch), h, w)
        return {
            "denoise": per_step * steps + sum(self.hint_embedding(h, w) for h, w in shapes),
            "encode": self.vae_pass("encode", height, width, window),
            "decode": self.vae_pass("decode", height, width, window),
            "prompts": self.prompts(settings.uses_cfg),
        }


def latent_tiling(settings, height: int, width: int) -> tuple[int, int]:
    """(tile, overlap) as the pipeline plans them: the settings' own, or the automatic tiling."""
    tile, overlap = settings.latent_tile, getattr(settings, "latent_overlap", None)
    if tile is None:
        from pasd_cli.engine.tiling import auto_tiling

        plan = auto_tiling(height, width, overlap)
        return plan.tile, plan.overlap
    return tile, 8 if overlap is None else overlap


def vae_window(settings, config, latent_h: int, latent_w: int, device: str) -> int:
    """The VAE attention window the pipeline uses (0: global)."""
    window = settings.vae_attention_window
    if window is not None:
        return window
    from pasd_cli.engine.vae_attention import auto_attention_window

    return auto_attention_window(config, latent_h, latent_w, device)


def hint_size(input_size: tuple[int, int], scale: float, process_size: int) -> tuple[int, int]:
    from PIL import Image

    from pasd_cli.engine.resize import make_hint

    return make_hint(Image.new("RGB", input_size), scale, process_size).size


# ---------------------------------------------------------------------------------- the table


def matmul_peak(device: str, dtype_name: str) -> float:
    """FLOP/s of one large matrix product on `device` in `dtype_name`, all threads: the most any
    step of mostly matrix products and convolutions could reach there."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    n = 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty_like(a)  # made once: no page faults in the timing
    best = float("inf")
    for _ in range(20):  # the best of several: what the hardware gives when nothing interferes
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def _median(rows: list[dict], key: str):
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def _levels(path_a: str, path_b: str) -> tuple[float, int]:
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(path_a), dtype=np.int16)
    b = np.asarray(Image.open(path_b), dtype=np.int16)
    diff = np.abs(a - b)
    return float(diff.mean()), int(diff.max())


def table(names: list[str], results: dict[str, dict], baseline: str) -> str:
    rows: list[tuple[str, str, int, bool]] = [
        ("imports (s)", "imports_s", 1, False),
        ("load (s)", "load_s", 1, True),
        ("first load: converts, keeps a copy (s)", "first_load_s", 1, True),
        ("its copy, written in the background (s)", "copies_written_s", 1, False),
        ("peak RSS while first loading (GB)", "first_load_peak_rss_gb", 2, True),
        ("to first step (s)", "to_first_step_s", 1, True),
        ("first step (s)", "first_step_s", 1, True),
        ("s/step (after the first)", "step_s", 1, True),
        ("s/step at the matmul peak (floor)", "step_floor_s", 1, True),
        ("achieved, % of the matmul peak", "peak_percent", 0, False),
        ("CPU s: load", "load_cpu_s", 1, True),
        ("CPU s/step (after the first)", "step_cpu_s", 1, True),
        ("CPU s: total, measured steps", "total_cpu_s", 1, True),
        ("VAE encode (s)", "encode_s", 1, True),
        ("VAE decode (s)", "decode_s", 1, True),
        ("total, measured steps (s)", "total_s", 1, True),
        ("total at own steps (s)", "projected_s", 1, True),
        ("weights (GB)", "weights_gb", 2, True),
        ("peak RSS while loading (GB)", "load_peak_rss_gb", 2, True),
        ("peak RSS (GB)", "peak_rss_gb", 2, True),
        ("peak RSS: prompts + encode / steps / decode (GB)", "stage_peaks_gb", 2, False),
        ("CUDA peak allocated (GB)", "cuda_peak_gb", 2, True),
        ("UNet evaluations", "unet_evaluations", 0, True),
        ("TFLOP, measured steps", "tflop", 2, True),
        ("TFLOP at own steps", "tflop_own", 2, True),
    ]
    header = "| | " + " | ".join(f"{n} (`{results[n]['flags']}`)" for n in names) + " |"
    lines = [header, "|---" * (len(names) + 1) + "|"]
    base = results[baseline]
    for label, key, digits, ratio in rows:
        if all(results[n].get(key) is None for n in names):
            continue
        cells = []
        for n in names:
            value = results[n].get(key)
            if value is None:
                cells.append("-")
                continue
            text = value if isinstance(value, str) else f"{value:.{digits}f}"
            if ratio and n != baseline and base.get(key):
                text += f" ({value / base[key]:.2f}x)"
            cells.append(text)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    info = []
    for n in names:
        r = results[n]
        info.append(
            f"{r['dtype']}"
            + (f", made in {r['made_in']}" if r["made_in"] != r["dtype"].split()[0] else "")
            + f", {r['steps']} steps, {r['latent_tiles']} tile(s)"
        )
    lines.append("| dtype, steps, tiles | " + " | ".join(info) + " |")
    lines.append(
        "| levels from baseline (mean / max) | "
        + " | ".join("-" if n == baseline else "{:.2f} / {}".format(*results[n]["levels"]) for n in names)
        + " |"
    )
    return "\n".join(lines)


def _run_child(name: str, child_args: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", name, "--child-args", json.dumps(child_args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        print(f"{name}: failed\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
        sys.exit(1)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-args", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--configs",
        help="comma-separated (default: exact,default,bf16,fast on the CPU; exact,default,fast,compile on CUDA)",
    )
    parser.add_argument("--baseline", default="exact")
    parser.add_argument(
        "--models",
        type=Path,
        default=Path.home() / ".cache" / "pasd-bench",
        help="where the random SD-size models are kept",
    )
    parser.add_argument("--input-size", type=int, default=256)
    parser.add_argument("--scale", type=float, default=2)
    parser.add_argument("--process-size", type=int, default=512)
    parser.add_argument(
        "--steps", type=int, default=2, help="steps of the timed runs (--fast configurations run their own)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="rounds; configurations alternate, medians shown")
    parser.add_argument("--flops-sizes", default="1024,2048,4096", help="output sides for the FLOP-only table")
    parser.add_argument("--json", type=Path, help="also write every run here")
    parser.add_argument(
        "--runs",
        type=Path,
        help="append each run to this JSON-lines file as it ends; with --no-run, make the tables from it",
    )
    parser.add_argument("--no-run", action="store_true", help="run nothing: the tables from --runs")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, json.loads(args.child_args))), flush=True)
        return

    sys.path.insert(0, str(ROOT))
    known = configs()
    default_configs = "exact,default,fast,compile" if args.device.startswith("cuda") else "exact,default,bf16,fast"
    names = (args.configs or default_configs).split(",")
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown configuration(s) {', '.join(unknown)}; known: {', '.join(known)}")
    if args.baseline not in names:
        names.insert(0, args.baseline)
    models = ensure_models(args.models)
    out = args.models / "outputs"
    out.mkdir(exist_ok=True)
    child_args = {
        "device": args.device,
        "models": {k: str(v) for k, v in models.items()},
        "input_size": args.input_size,
        "scale": args.scale,
        "process_size": args.process_size,
        "steps": args.steps,
        "out": str(out),
        "converted": str(args.models / "converted"),
    }
    print(
        f"SD-1.5-size random weights, {args.device}, {args.input_size}x{args.input_size} input, x{args.scale:g}, "
        f"process size {args.process_size}, {args.steps} steps (--fast: its own), {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.1f}",
        file=sys.stderr,
        flush=True,
    )
    runs: dict[str, list[dict]] = {n: [] for n in names}
    first_loads: dict[str, dict] = {}
    if not args.no_run:
        # The first load of a configuration that converts weights keeps the converted copy, and
        # the timed runs map it, as a user's second run does: that first load is measured apart.
        shutil.rmtree(child_args["converted"], ignore_errors=True)
        for name in names:
            row = _run_child(name, {**child_args, "load_only": True})
            first_loads[name] = row
            print(f"first load {name}: {row['load_s']:.1f} s", file=sys.stderr, flush=True)
    if args.no_run:
        if not args.runs:
            parser.error("--no-run needs --runs")
        for line in args.runs.read_text().splitlines():
            row = json.loads(line)
            row.setdefault("first_step_s", row["step_s"])  # rows of before the first step was apart
            if row["config"] in runs:
                runs[row["config"]].append(row)
        names = [n for n in names if runs[n]]
    for round_ in range(0 if args.no_run else args.repeat):
        for name in names:
            row = _run_child(name, child_args)
            runs[name].append(row)
            if args.runs:
                with args.runs.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
            print(
                f"round {round_ + 1} {name}: load {row['load_s']:.1f} s, {row['step_s']:.1f} s/step, "
                f"run {row['run_s']:.1f} s, peak RSS {row['peak_rss'] / 2**30:.2f} GB",
                file=sys.stderr,
                flush=True,
            )

    census = FlopCensus()
    peaks: dict[str, float] = {}  # matmul FLOP/s per compute dtype, measured once the runs are over
    size = hint_size((args.input_size, args.input_size), args.scale, args.process_size)
    results: dict[str, dict] = {}
    for name in names:
        config, rows = known[name], runs[name]
        summary = {
            k: _median(rows, k)
            for k in rows[0]
            if isinstance(rows[0][k], (int, float)) and not isinstance(rows[0][k], bool)
        }
        summary.update({k: rows[0][k] for k in ("dtype", "made_in", "latent_tiles", "output", "steps")})
        summary["flags"] = config.flags
        if name in first_loads:
            first = first_loads[name]
            summary["first_load_s"] = first["load_s"]
            summary["copies_written_s"] = first["copies_written_s"] if first["copies_gb"] else None
            summary["first_load_peak_rss_gb"] = first["load_peak_rss"] / 2**30
        own_steps = config.real_steps
        summary["projected_s"] = (
            summary["load_s"]
            + summary["prompt_s"]
            + summary["encode_s"]
            + summary["first_step_s"]
            + (own_steps - 1) * summary["step_s"]
            + summary["decode_s"]
        )
        for key in ("load_peak_rss", "peak_rss", "cuda_peak"):
            summary[f"{key}_gb"] = summary[key] / 2**30 if summary.get(key) is not None else None
        stages = [summary.get(f"{stage}_peak_rss") for stage in ("encode", "steps", "decode")]
        summary["stage_peaks_gb"] = None if None in stages else " / ".join(f"{peak / 2**30:.2f}" for peak in stages)
        summary["weights_gb"] = summary["weights_bytes"] / 2**30
        settings = settings_for(config, child_args)
        flops = census.image(settings, size[1], size[0], summary["steps"], args.device)
        summary["tflop"] = sum(flops.values()) / 1e12
        summary["tflop_own"] = sum(census.image(settings, size[1], size[0], own_steps, args.device).values()) / 1e12
        step_flops = (
            census.image(settings, size[1], size[0], 2, args.device)["denoise"]
            - census.image(settings, size[1], size[0], 1, args.device)["denoise"]
        )
        # The dtype the child computed in ("float32 (16-bit weights kept)", "bfloat16", ...).
        compute = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[summary["dtype"].split()[0]]
        if compute not in peaks:
            peaks[compute] = matmul_peak(args.device, compute)
        summary["step_floor_s"] = step_flops / peaks[compute]
        summary["peak_percent"] = 100 * summary["step_floor_s"] / summary["step_s"]
        summary["flops"] = flops
        results[name] = summary
    for name in names:
        results[name]["levels"] = _levels(results[name]["output"], results[args.baseline]["output"])

    print(table(names, results, args.baseline))
    print()
    print(
        "Matmul peak (2048x2048, best of 20): "
        + ", ".join(f"{name} {flops / 1e9:.0f} GFLOP/s" for name, flops in peaks.items())
        + ". The floor is a step's FLOPs at that rate."
    )
    print()
    sizes = [int(s) for s in args.flops_sizes.split(",") if s]
    if sizes:
        print("TFLOP per image at each configuration's own steps (x baseline), output side in pixels:")
        print()
        print("| output | " + " | ".join(names) + " |")
        print("|---" * (len(names) + 1) + "|")
        for side in sizes:
            cells, base = [], None
            for name in [args.baseline, *[n for n in names if n != args.baseline]]:
                config = known[name]
                settings = settings_for(config, {**child_args, "scale": 1, "process_size": side})
                tflop = sum(census.image(settings, side, side, config.real_steps, args.device).values()) / 1e12
                base = base or tflop
                cells.append((name, f"{tflop:,.0f}" + ("" if name == args.baseline else f" ({tflop / base:.2f}x)")))
            order = dict(cells)
            print(f"| {side} | " + " | ".join(order[n] for n in names) + " |")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "summary": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
