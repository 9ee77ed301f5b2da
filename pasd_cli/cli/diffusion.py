"""The model and diffusion options every PASD command shares, declared once, and the steps that
turn them into a loaded pipeline."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import typer

from ..batch import settings as defaults
from ..errors import UsageError
from .batch_options import number_field
from .models import MODELS_DIR_HELP
from .option_groups import option_group


@dataclass(frozen=True)
class ModelChoice:
    pasd: str
    base: str
    offline: bool
    models_dir: Optional[Path]
    device: str
    dtype: str
    vae_memory_mb: Optional[int] = None  # None: a share of the device's free memory
    base_flag: str = "--base"  # the option that named `base`, for messages


@dataclass(frozen=True)
class DiffusionOptions:
    settings: defaults.UpscaleSettings
    models: ModelChoice


BASE_HELP = "Stable Diffusion 1.5: a model name, or a folder in diffusers layout."


def _parameters(d: defaults.UpscaleSettings, pasd_model: str, base_flag: str, base_help: str) -> list:
    return [
        (
            "pasd",
            typer.Option(
                pasd_model, "--pasd", help="PASD model: a name from `pasd models list`, or a checkpoint folder."
            ),
            str,
        ),
        (_parameter_name(base_flag), typer.Option(defaults.BASE_MODEL, base_flag, help=base_help), str),
        ("offline", typer.Option(False, "--offline", help="Never use the network; fail if a model is missing."), bool),
        ("models_dir", typer.Option(None, "--models-dir", help=MODELS_DIR_HELP), Optional[Path]),
        ("steps", typer.Option(d.steps, "--steps", min=1, help="Denoising steps."), int),
        (
            "guidance",
            typer.Option(d.guidance, "--guidance", help="Classifier-free guidance; <= 1 turns it off."),
            float,
        ),
        (
            "conditioning_scale",
            typer.Option(
                d.conditioning_scale, "--conditioning-scale", min=0.0, help="Strength of the image condition."
            ),
            float,
        ),
        ("scale", typer.Option(d.scale, "--scale", min=0.01, help="Output size / input size."), float),
        (
            "process_size",
            typer.Option(d.process_size, "--process-size", min=8, help="Short side the model works at, at least."),
            int,
        ),
        (
            "added_noise_level",
            typer.Option(
                d.added_noise_level,
                "--added-noise-level",
                min=0,
                max=999,
                help="Timestep of the noise added to the initial latent.",
            ),
            int,
        ),
        ("prompt", typer.Option(d.prompt, "--prompt", help="Text that describes the image."), str),
        ("added_prompt", typer.Option(d.added_prompt, "--added-prompt", help="Appended to every prompt."), str),
        ("negative_prompt", typer.Option(d.negative_prompt, "--negative-prompt"), str),
        ("seed", typer.Option(d.seed, "--seed", help="Seed of each image's random draws."), int),
        (
            "latent_tile",
            typer.Option(d.latent_tile, "--latent-tile", min=8, help="Latent tile side (pixels / 8)."),
            int,
        ),
        ("latent_overlap", typer.Option(d.latent_overlap, "--latent-overlap", min=0, help="Latent tile overlap."), int),
        (
            "blend",
            typer.Option(
                d.blend, "--latent-blend", help="gaussian (released) or ramp (cross-fade over the whole overlap)."
            ),
            str,
        ),
        (
            "tile_batch",
            typer.Option(
                d.tile_batch, "--tile-batch", min=1, help="Latent tiles per forward pass (same result, more memory)."
            ),
            int,
        ),
        (
            "vae_tile",
            typer.Option(
                d.vae_tile,
                "--vae-tile",
                min=0,
                show_default="auto",
                help="VAE tile side in pixels; 0 = off. Exact either way.",
            ),
            Optional[int],
        ),
        (
            "vae_memory",
            typer.Option(
                None,
                "--vae-memory",
                min=1,
                show_default=f"{defaults.VAE_MEMORY_SHARE:.0%} of the free memory",
                help="MB the VAE may use; decides automatic VAE tiling.",
            ),
            Optional[int],
        ),
        (
            "vae_attention_window",
            typer.Option(
                d.vae_attention_window,
                "--vae-attention-window",
                min=0,
                help="Approximate the VAE's global attention by a window of this many latent pixels; 0 = exact.",
            ),
            int,
        ),
        ("color_fix", typer.Option(d.color_fix, "--color-fix", help="wavelet, adain or none."), str),
        ("device", typer.Option("auto", "--device", help="auto, cpu, cuda or mps."), str),
        ("dtype", typer.Option("auto", "--dtype", help="auto, fp32, fp16 or bf16."), str),
    ]


def _parameter_name(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def diffusion_options(
    settings_class: type = defaults.UpscaleSettings,
    pasd_model: str = defaults.PASD_MODEL,
    base_flag: str = "--base",
    base_help: str = BASE_HELP,
) -> callable:
    """Replaces a command's `diffusion` parameter with the shared options, defaults taken from
    `settings_class`, packed into `DiffusionOptions`. `base_flag` renames the SD 1.5 option for a
    command whose own --base means something else (stylize: `--sd15`)."""
    preset = settings_class()
    base_name = _parameter_name(base_flag)

    def build(pasd, offline, models_dir, device, dtype, vae_memory, **values) -> DiffusionOptions:
        from .runtime import DEVICES, DTYPES

        base = values.pop(base_name)
        device, dtype = device.lower(), dtype.lower()
        for flag, value, choices in (("--device", device, DEVICES), ("--dtype", dtype, DTYPES)):
            if value not in choices:  # checked here too, so that a dry run refuses it
                raise UsageError(f"{flag} {value}: choose from {', '.join(choices)}")
        try:
            run_settings = replace(preset, **values)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        return DiffusionOptions(
            run_settings,
            ModelChoice(pasd, base, offline, models_dir, device, dtype, vae_memory_mb=vae_memory, base_flag=base_flag),
        )

    return option_group("diffusion", _parameters(preset, pasd_model, base_flag, base_help), build)


def resolve_model_dirs(models: ModelChoice, say, extra: list[tuple[str, str]] = ()) -> tuple[Path, ...]:
    """(pasd folder, SD 1.5 folder, then a path for each (spec, option) in `extra`), resolved
    together so that every missing model is named in one error with one download command."""
    from ..store.local import offline_requested, resolve_models, runs_at_terminal

    if offline_requested(models.offline):
        os.environ["HF_HUB_OFFLINE"] = "1"  # for every library loaded below, not just our store
    return tuple(
        resolve_models(
            [(models.pasd, "--pasd"), (models.base, models.base_flag), *extra],
            models_dir=models.models_dir,
            offline=models.offline,
            interactive=runs_at_terminal(),
            say=say,
        )
    )


def pick_runtime(models: ModelChoice):
    """(torch device, torch dtype) from --device and --dtype."""
    from .runtime import limit_heap_fragmentation, pick_device, pick_dtype, use_true_fp32

    limit_heap_fragmentation()
    device = pick_device(models.device)
    dtype = pick_dtype(models.dtype, device)
    use_true_fp32(device, dtype)
    return device, dtype


def vae_memory_budget(models: ModelChoice, device) -> int:
    """Bytes a VAE pass may use: --vae-memory, else a share of what the device has free now
    (call it once the models are loaded)."""
    from .runtime import memory_budget

    return models.vae_memory_mb * 2**20 if models.vae_memory_mb else memory_budget(device)


def quiet_libraries() -> None:
    """Library logs and progress bars would drown our own stderr lines."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def model_identity(pasd_dir: Path, base_dir: Path, pipeline, device, dtype) -> dict:
    """What every output's metadata says about the model that made it."""
    from .runtime import dtype_name

    return {
        "pasd": str(pasd_dir),
        "base": str(base_dir),
        "variant": pipeline.unet.paca_variant,
        "rrdb_blocks": pipeline.controlnet.rrdb_blocks,
        "device": str(device),
        "dtype": dtype_name(dtype),
    }


def name_fields(run_settings: defaults.UpscaleSettings) -> dict[str, str]:
    """Fields a --name template may use."""
    return {"scale": number_field(run_settings.scale), "seed": str(run_settings.seed), "steps": str(run_settings.steps)}


def planned_size(run_settings: defaults.UpscaleSettings):
    """Output size for a dry run's plan, from the input size alone (no torch import)."""
    from ..engine.resize import output_size

    return lambda size: output_size(size, run_settings.scale)
