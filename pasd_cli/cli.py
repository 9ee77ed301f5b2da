"""The `pasd` command line. The one place that maps errors to exit codes.

Heavy libraries (torch, diffusers) are imported inside command bodies so `pasd --help` is fast.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from . import settings as defaults
from .batch_cli import batch_options, number_field, run_batch_command
from .errors import Interrupted, PasdError, UsageError
from .models_cli import MODELS_DIR_HELP, download_command, models_app

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
@batch_options
def upscale(
    batch: defaults.BatchSettings,
    pasd: str = typer.Option(defaults.PASD_MODEL, "--pasd",
                             help="PASD model: a name from `pasd models list`, or a checkpoint folder."),
    base: str = typer.Option(defaults.BASE_MODEL, "--base",
                             help="Stable Diffusion 1.5: a model name, or a folder in diffusers layout."),
    offline: bool = typer.Option(False, "--offline", help="Never use the network; fail if a model is missing."),
    models_dir: Optional[Path] = typer.Option(None, "--models-dir", help=MODELS_DIR_HELP),
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
    color_fix: str = typer.Option(_D.color_fix, "--color-fix", help="wavelet, adain or none."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, fp32, fp16 or bf16."),
):
    """Upscale images (PASD real-world super-resolution).

    Results are written atomically to -o; existing outputs are skipped, so a re-run only does what is left.
    """
    try:
        run_settings = defaults.UpscaleSettings(
            steps=steps, guidance=guidance, conditioning_scale=conditioning_scale, scale=scale,
            process_size=process_size, added_noise_level=added_noise_level, prompt=prompt,
            added_prompt=added_prompt, negative_prompt=negative_prompt, seed=seed,
            latent_tile=latent_tile, latent_overlap=latent_overlap, color_fix=color_fix)
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    def load_worker(reporter):
        """Called once, and only when some image needs the model."""
        from .devices import pick_device, pick_dtype
        from .store import offline_requested, resolve_models, runs_at_terminal

        if offline_requested(offline):
            os.environ["HF_HUB_OFFLINE"] = "1"  # for every library loaded below, not just our store
        pasd_dir, base_dir = resolve_models([(pasd, "--pasd"), (base, "--base")], models_dir=models_dir,
                                            offline=offline, interactive=runs_at_terminal(), say=reporter.info)
        torch_device = pick_device(device)
        torch_dtype = pick_dtype(dtype, torch_device)

        _quiet_libraries()
        from .engine.pipeline import PASDPipeline
        from .image_job import image_worker
        from .upscale_job import upscale_record, upscale_transform

        reporter.info(f"loading PASD from {pasd_dir} on {torch_device} ({dtype})")
        pipeline = PASDPipeline.from_folders(pasd_dir, base_dir, torch_device, torch_dtype)
        model = {"pasd": str(pasd_dir), "base": str(base_dir), "variant": pipeline.unet.paca_variant,
                 "device": str(torch_device), "dtype": str(torch_dtype).removeprefix("torch.")}
        return image_worker(upscale_transform(pipeline, run_settings), upscale_record(run_settings, model), batch)

    from .engine.resize import output_size  # pure PIL arithmetic; imports no torch

    run_batch_command(batch, name_fields={"scale": number_field(scale), "seed": str(seed), "steps": str(steps)},
                      seed=seed, prepare=load_worker, output_size=lambda size: output_size(size, scale))


app.command("download", epilog=EXIT_CODES_HELP)(download_command)
app.add_typer(models_app, name="models")


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
