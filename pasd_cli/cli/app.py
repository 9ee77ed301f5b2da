"""The `pasd` command line. The one place that maps errors to exit codes.

Heavy libraries (torch, diffusers) are imported inside command bodies so `pasd --help` is fast.
"""

from __future__ import annotations

import signal
import sys

import typer

from ..batch import settings as defaults
from ..batch.prompt_pass import CaptionOptions, ImagePrompts, caption_options
from ..errors import Interrupted, PasdError
from .batch_options import batch_options, run_batch_command
from .diffusion import (
    DiffusionOptions,
    diffusion_options,
    model_identity,
    name_fields,
    pick_runtime,
    planned_size,
    quiet_libraries,
    resolve_model_dirs,
    vae_memory_budget,
)
from .models import download_command, models_app
from .runtime import dtype_name
from .stylize import (
    SD15_HELP,
    StyleChoice,
    fast_settings,
    given_on_command_line,
    preflight,
    resolve_style,
    style_identity,
    style_options,
    stylize_record,
)

EXIT_CODES_HELP = (
    "Exit codes: 0 all done or skipped, 1 some inputs failed, 2 usage, "
    "3 model or weights, 4 device or resources, 130 interrupted."
)

app = typer.Typer(
    name="pasd",
    help="Restore and enlarge images with Pixel-Aware Stable Diffusion (PASD).\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root():
    """Restore and enlarge images with Pixel-Aware Stable Diffusion (PASD)."""


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@app.command(epilog=EXIT_CODES_HELP)
@batch_options
@diffusion_options(defaults.UpscaleSettings, defaults.PASD_MODEL)
@caption_options
def upscale(batch: defaults.BatchSettings, diffusion: DiffusionOptions, captions: CaptionOptions):
    """Upscale images (PASD real-world super-resolution).

    Results are written atomically to -o; existing outputs are skipped, so a re-run only does what is left.
    """
    run_settings, models = diffusion.settings, diffusion.models
    prompts = ImagePrompts(captions, batch, diffusion)

    def load_worker(reporter):
        """Called once, and only when some image needs the model."""
        pasd_dir, base_dir = resolve_model_dirs(models, reporter.info)
        device, dtype = pick_runtime(models)
        quiet_libraries()
        from ..batch.image_job import image_worker
        from ..engine.pipeline import PASDPipeline
        from .upscale import upscale_record, upscale_transform

        reporter.info(f"loading PASD from {pasd_dir} on {device} ({dtype_name(dtype)})")
        pipeline = PASDPipeline.from_folders(pasd_dir, base_dir, device, dtype)
        pipeline.memory_budget = vae_memory_budget(models, device)
        identity = model_identity(pasd_dir, base_dir, pipeline, device, dtype)
        transform = upscale_transform(pipeline, run_settings, prompts, warn=reporter.warn)
        return image_worker(transform, upscale_record(run_settings, identity), batch)

    run_batch_command(
        batch,
        name_fields=name_fields(run_settings),
        seed=run_settings.seed,
        prepare=load_worker,
        output_size=planned_size(run_settings),
        prepass=prompts.prepass,
    )


@app.command(epilog=EXIT_CODES_HELP)
@style_options  # outermost, so --help lists --base and --lora first
@batch_options
@diffusion_options(defaults.StylizeSettings, defaults.STYLIZE_PASD, base_flag="--sd15", base_help=SD15_HELP)
@caption_options
def stylize(
    ctx: typer.Context,
    batch: defaults.BatchSettings,
    diffusion: DiffusionOptions,
    style: StyleChoice,
    captions: CaptionOptions,
):
    """Stylize images: PASD on a personalized Stable Diffusion 1.5 base (--base), with LoRAs.

    Defaults follow the authors' advice: PASD-light, conditioning scale 0.7 (smaller is more stylized), scale 1.

    The base's stock UNet weights, VAE and text encoder are used; PASD's own layers always stay.
    """
    run_settings, models = diffusion.settings, diffusion.models
    if style.fast:
        run_settings = fast_settings(run_settings, given_on_command_line(ctx))
    preflight(style)  # a refused base stops here: nothing loaded, nothing unpickled
    prompts = ImagePrompts(
        captions, batch, diffusion, check_models=lambda reporter: resolve_style(style, models, reporter.info)
    )

    def load_worker(reporter):
        """Called once, and only when some image needs the model."""
        files = resolve_style(style, models, reporter.info)
        device, dtype = pick_runtime(models)
        quiet_libraries()
        from ..batch.image_job import image_worker
        from ..engine.loading import load_components
        from ..engine.pipeline import PASDPipeline
        from ..engine.stylize import personalize
        from .upscale import upscale_transform

        reporter.info(f"loading PASD from {files.pasd} on {device} ({dtype_name(dtype)})")
        components = load_components(files.pasd, files.sd15)
        # On the CPU in float32, before the move to the device: merges are exact and cost no VRAM.
        report = personalize(
            components,
            base=files.base,
            blend=style.blend,
            loras=files.loras,
            lcm_lora=files.lcm_lora,
            trust_pickle=style.trust_pickle,
            on_stage=lambda what, source: reporter.info(f"applying {what} {source}"),
        )
        pipeline = PASDPipeline(components, device, dtype)
        pipeline.memory_budget = vae_memory_budget(models, device)  # measured with the models in place
        identity = style_identity(model_identity(files.pasd, files.sd15, pipeline, device, dtype), style, report)
        transform = upscale_transform(pipeline, run_settings, prompts, warn=reporter.warn)
        return image_worker(transform, stylize_record(run_settings, identity), batch)

    run_batch_command(
        batch,
        name_fields=name_fields(run_settings),
        seed=run_settings.seed,
        prepare=load_worker,
        output_size=planned_size(run_settings),
        prepass=prompts.prepass,
    )


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
        # One line, whatever a library's message that ended up in ours looks like.
        _say("error: " + "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()))
        if exc.hint:
            _say(f"hint: {exc.hint}")
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
