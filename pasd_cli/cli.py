"""The `pasd` command line. The one place that maps errors to exit codes.

Heavy libraries (torch, diffusers) are imported inside command bodies so `pasd --help` is fast.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from . import settings as defaults
from .errors import InputError, Interrupted, PasdError, UsageError

EXIT_CODES_HELP = ("Exit codes: 0 all done or skipped, 1 some inputs failed, 2 usage, "
                   "3 model or weights, 4 device or resources, 130 interrupted.")

app = typer.Typer(
    name="pasd",
    help="Restore and enlarge images with Pixel-Aware Stable Diffusion (PASD).\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_D = defaults.UpscaleSettings()


@app.callback()
def _root():
    """Restore and enlarge images with Pixel-Aware Stable Diffusion (PASD)."""


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _quiet_libraries() -> None:
    """Library logs and progress bars would drown our own stderr lines."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@app.command(epilog=EXIT_CODES_HELP)
def upscale(
    input: str = typer.Argument(..., help="An image file or a folder of images."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for the results."),
    pasd: Optional[str] = typer.Option(None, "--pasd", help="PASD checkpoint folder (with unet/ and controlnet/)."),
    base: Optional[str] = typer.Option(None, "--base", help="Stable Diffusion 1.5 folder (diffusers layout)."),
    steps: int = typer.Option(_D.steps, "--steps", min=1, help="Denoising steps."),
    guidance: float = typer.Option(_D.guidance, "--guidance", help="Classifier-free guidance; <= 1 turns it off."),
    conditioning_scale: float = typer.Option(_D.conditioning_scale, "--conditioning-scale", min=0.0,
                                             help="Strength of the image condition."),
    scale: float = typer.Option(_D.scale, "--scale", min=0.01, help="Output size / input size."),
    process_size: int = typer.Option(_D.process_size, "--process-size", min=8,
                                     help="Short side the model works at, at least."),
    added_noise_level: int = typer.Option(_D.added_noise_level, "--added-noise-level", min=0, max=999,
                                          help="Timestep of the noise added to the initial latent."),
    prompt: str = typer.Option(_D.prompt, "--prompt", help="Text that describes the image."),
    added_prompt: str = typer.Option(_D.added_prompt, "--added-prompt", help="Appended to every prompt."),
    negative_prompt: str = typer.Option(_D.negative_prompt, "--negative-prompt"),
    seed: int = typer.Option(_D.seed, "--seed", help="Seed of each image's random draws."),
    latent_tile: int = typer.Option(_D.latent_tile, "--latent-tile", min=8, help="Latent tile side (pixels / 8)."),
    latent_overlap: int = typer.Option(_D.latent_overlap, "--latent-overlap", min=0, help="Latent tile overlap."),
    latent_blend: str = typer.Option(_D.blend, "--latent-blend",
                                     help="gaussian (released) or ramp (cross-fade over the whole overlap)."),
    tile_batch: int = typer.Option(_D.tile_batch, "--tile-batch", min=1,
                                   help="Latent tiles per forward pass (same result, more memory)."),
    vae_tile: Optional[int] = typer.Option(None, "--vae-tile", min=0, show_default="auto",
                                           help="VAE tile side in pixels; 0 = off. Exact either way."),
    vae_memory: Optional[int] = typer.Option(None, "--vae-memory", min=1, show_default="half the free memory",
                                              help="MB the VAE may use; decides automatic tiling."),
    vae_attention_window: int = typer.Option(_D.vae_attention_window, "--vae-attention-window", min=0,
                                             help="Approximate the VAE's global attention by a window of "
                                                  "this many latent pixels; 0 = exact."),
    color_fix: str = typer.Option(_D.color_fix, "--color-fix", help="wavelet, adain or none."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, fp32, fp16 or bf16."),
):
    """Upscale images (PASD real-world super-resolution)."""
    from .batch import find_inputs, output_path
    from .devices import limit_heap_fragmentation, memory_budget, pick_device, pick_dtype
    from .store import resolve_model

    try:
        run_settings = defaults.UpscaleSettings(
            steps=steps, guidance=guidance, conditioning_scale=conditioning_scale, scale=scale,
            process_size=process_size, added_noise_level=added_noise_level, prompt=prompt,
            added_prompt=added_prompt, negative_prompt=negative_prompt, seed=seed,
            latent_tile=latent_tile, latent_overlap=latent_overlap, color_fix=color_fix,
            blend=latent_blend, tile_batch=tile_batch, vae_tile=vae_tile,
            vae_attention_window=vae_attention_window)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    inputs = find_inputs(input)
    if not inputs:
        raise UsageError(f"{input}: no images found")
    pasd_dir = resolve_model(pasd, "--pasd")
    base_dir = resolve_model(base, "--base")
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)

    _quiet_libraries()
    limit_heap_fragmentation()
    from .engine.pipeline import PASDPipeline
    from .imageio import read_rgb, save_image

    _say(f"loading PASD from {pasd_dir} on {torch_device} ({dtype})")
    pipeline = PASDPipeline.from_folders(pasd_dir, base_dir, torch_device, torch_dtype)
    pipeline.memory_budget = vae_memory * 2**20 if vae_memory else memory_budget(torch_device)
    failed = 0
    for number, source in enumerate(inputs, 1):
        _say(f"[{number}/{len(inputs)}] {source}")
        try:
            result = pipeline.upscale(read_rgb(source), run_settings,
                                      on_warning=lambda message: _say(f"warning: {message}"))
            target = output_path(source, output)
            save_image(result.image, target)
            _say(f"  tiles: latent {result.latent_tiles}, VAE "
                 + (f"{result.vae_tile} px" if result.vae_tile else "untiled"))
        except InputError as exc:
            failed += 1
            _say(f"error: {exc}")
            continue
        print(target, flush=True)
    if failed:
        raise typer.Exit(1)


def _raise_interrupted(signum, frame):
    raise Interrupted(f"interrupted by {signal.Signals(signum).name}")


def main(argv: list[str] | None = None) -> None:
    # Our handlers replace KeyboardInterrupt, which click would turn into exit code 1.
    signal.signal(signal.SIGINT, _raise_interrupted)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        app(args=argv, prog_name="pasd")
    except PasdError as exc:
        _say(f"error: {exc}")
        if exc.hint:
            _say(f"hint: {exc.hint}")
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
