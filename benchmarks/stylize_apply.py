"""Cost of putting a personalized base and a LoRA under PASD at full SD 1.5 size, on the CPU.

Builds SD 1.5-size components (light PASD UNet, VAE, text encoder) with zeroed weights, writes an
fp16 single-file checkpoint in the LDM layout (as civitai ships them) and a rank-32 kohya LoRA on
every attention projection, then times, in one process:
  baseline  safetensors.load_file of the checkpoint (the unavoidable read)
  apply     apply_base(components, checkpoint): read + convert + blend UNet + build VAE/TE
  lora      apply_lora(components, lora)
and reports apply / baseline and the peak resident memory. Needs about 8 GB of RAM and 3 GB of
disk in the temporary folder.

    python benchmarks/stylize_apply.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the LDM-layout writer lives with the tests

from ldm_layout import checkpoint_from_parts  # noqa: E402

from pasd_cli.engine.bases import apply_base, stock_unet_keys  # noqa: E402
from pasd_cli.engine.loading import Components  # noqa: E402
from pasd_cli.engine.lora import apply_lora  # noqa: E402
from pasd_cli.engine.single_file import sd15_config  # noqa: E402
from pasd_cli.nn.loading import build_pasd_unet  # noqa: E402


def _zeroed(build):
    with torch.device("meta"):
        model = build()
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.zero_()
    return model.eval().requires_grad_(False)


def _components() -> Components:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = _zeroed(lambda: build_pasd_unet(sd15_config("unet"), "light"))
    vae = _zeroed(lambda: AutoencoderKL.from_config(sd15_config("vae")))
    text_config = CLIPTextConfig.from_dict(sd15_config("text_encoder"))
    text_encoder = _zeroed(lambda: CLIPTextModel(text_config))
    text_encoder.get_submodule("embeddings").position_ids.copy_(torch.arange(77)[None])
    return Components(unet, None, vae, text_encoder, None, {})


def _lora(components: Components, stock: set[str], rank: int = 32) -> dict[str, torch.Tensor]:
    state = {}
    for name, module in components.unet.named_modules():
        if name.endswith(("to_q", "to_k", "to_v", "to_out.0")) and f"{name}.weight" in stock:
            out_features, in_features = module.weight.shape
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn(rank, in_features, dtype=torch.float16) * 0.01
            state[f"{key}.lora_up.weight"] = torch.randn(out_features, rank, dtype=torch.float16) * 0.01
            state[f"{key}.alpha"] = torch.tensor(rank / 2, dtype=torch.float16)
    return state


def _timed(label: str, action):
    process = psutil.Process()
    start = time.perf_counter()
    result = action()
    seconds = time.perf_counter() - start
    print(f"{label:9s} {seconds:7.2f} s   rss now {process.memory_info().rss / 2**30:5.2f} GiB", flush=True)
    return result, seconds


def _write_files(folder: Path) -> tuple[Path, Path]:
    """Both files from meta-device models, before the measured process holds any weights."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = build_pasd_unet(sd15_config("unet"), "light")
        vae = AutoencoderKL.from_config(sd15_config("vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(sd15_config("text_encoder")))
    stock = set(stock_unet_keys(unet))
    meta = checkpoint_from_parts(
        {k: v for k, v in unet.state_dict().items() if k in stock}, unet.config, vae, text_encoder
    )
    checkpoint, lora = folder / "base.safetensors", folder / "lora.safetensors"
    save_file({k: torch.full(v.shape, 0.01, dtype=torch.float16) for k, v in meta.items()}, str(checkpoint))
    save_file(_lora(Components(unet, None, vae, text_encoder, None, {}), stock), str(lora))
    return checkpoint, lora


def _warm_page_cache(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 26):
            pass


def _peak_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, lora = _write_files(Path(tmp))
        print(
            f"checkpoint {checkpoint.stat().st_size / 2**30:.2f} GiB, lora {lora.stat().st_size / 2**20:.0f} MiB, "
            f"peak RSS while writing {_peak_gib():.2f} GiB"
        )
        components = _components()
        before = psutil.Process().memory_info().rss / 2**30
        print(f"SD 1.5-size components built: rss {before:.2f} GiB")
        _warm_page_cache(checkpoint)
        report, applied = _timed("apply", lambda: apply_base(components, checkpoint, blend=0.8))
        lora_report, merged = _timed("lora", lambda: apply_lora(components, lora, 0.7))
        peak = _peak_gib()
        # Baseline: the least any loader must do, read every tensor and upcast it to float32.
        state, baseline = _timed("baseline", lambda: {k: v.float() for k, v in load_file(str(checkpoint)).items()})
        del state
    print(
        f"apply / baseline = {applied / baseline:.2f}; {report.unet_tensors} UNet tensors blended, "
        f"replaced {', '.join(report.replaced)}; LoRA: {lora_report.unet_layers} layers in {merged:.2f} s; "
        f"peak RSS through apply and LoRA {peak:.2f} GiB (components alone {before:.2f} GiB)"
    )
