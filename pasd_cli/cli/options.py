"""Every option of the image commands, declared once: its flags, type (choices are Enums, so
`--help` lists them and shells complete them), help panel and help text, and the value its group
builds. Defaults come from the settings they fill (the engine's `UpscaleSettings`,
`StylizeSettings` and `ColorizeSettings`, `BatchSettings`), and so do bounds: a value out of
bounds is refused by the settings object, and the error names the option.

Nothing here imports torch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from ..batch.prompt_pass import PromptChoice
from ..batch.settings import BatchSettings
from ..batch.shard import Shard
from ..batch.world import PEER_TIMEOUT, World
from ..engine.settings import (
    BASE_BLEND,
    FAST_GUIDANCE,
    FAST_STEPS,
    CaptionSettings,
    ColorizeSettings,
    LoraSpec,
    UpscaleSettings,
)
from ..errors import UsageError
from ..imageio import DEFAULT_QUALITY
from ..store import BASE_MODEL, CAPTION_MODEL, CLASSIFY_MODEL, LCM_LORA
from .option_groups import BATCH, DIFFUSION, INPUT_OUTPUT, MODEL, PROMPTS, TILING, Group, Param, argument, option
from .runtime import VAE_MEMORY_SHARE
from .workers import launched_local_rank, launched_world

MODELS_DIR_HELP = "Model store folder (default: $PASD_HOME, else the user's cache folder)."


# ---------------------------------------------------------------------------------- choices


class Device(str, Enum):  # and cuda:N, one GPU of several (see device_choice)
    auto = "auto"  # CUDA, then MPS, then the CPU
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


_CUDA_INDEX = re.compile(r"cuda:(\d+)")


def device_choice(value: str) -> str:
    """--device: one of Device (any case), or cuda:N."""
    name = value.strip().lower()
    if name in Device.__members__ or _CUDA_INDEX.fullmatch(name):
        return name
    listed = ", ".join(d.value for d in Device)
    raise UsageError(f"--device {value}: choose from {listed}, cuda:N")


class Dtype(str, Enum):
    auto = "auto"  # fp16 on GPUs, bf16 on CPUs with bf16 matrix instructions, else fp32
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


class ColorFix(str, Enum):  # engine.settings.COLOR_FIXES
    wavelet = "wavelet"
    adain = "adain"
    none = "none"


class LatentBlend(str, Enum):  # engine.settings.BLENDS
    auto = "auto"  # ramp; gaussian with --exact
    gaussian = "gaussian"
    ramp = "ramp"


# Options that take a whole number or "auto" (the settings' None: the engine chooses).
AUTO = "auto"
AUTO_NUMBERS = ("latent_tile", "latent_overlap", "tile_batch", "vae_attention_window")


def auto_number(flag: str, text: str) -> int | None:
    if text.strip().casefold() == AUTO:
        return None
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{flag} {text}: must be a whole number or {AUTO}") from None


class OutputFormat(str, Enum):  # batch.settings.FORMATS
    png = "png"
    jpg = "jpg"
    webp = "webp"
    tiff = "tiff"
    same = "same"


class OnExists(str, Enum):  # batch.settings.ON_EXISTS
    skip = "skip"
    if_stale = "if-stale"  # made again when its recorded settings differ from this run's
    overwrite = "overwrite"
    error = "error"


class CaptionMode(str, Enum):  # engine.settings.CAPTION_MODES
    blip = "blip"
    classify = "classify"
    none = "none"


class Luma(str, Enum):  # engine.settings.LUMA_MODES
    exact = "exact"
    released = "released"


def _value(value: Any) -> Any:
    if value is LatentBlend.auto:
        return None
    return value.value if isinstance(value, Enum) else value


def setting_error(exc: ValueError, params: list[Param], values: dict[str, Any]) -> UsageError:
    """A settings object's refusal ("latent overlap must be in [0, latent tile)"), naming the
    option and the value given: the field is the one whose name starts the message."""
    text = str(exc)
    named = [p for p in params if text.casefold().startswith(p.name.replace("_", " ").casefold())]
    if not named:
        return UsageError(text)
    param = max(named, key=lambda p: len(p.name))
    flag = next((f for f in param.flags if f.startswith("--")), param.name)
    return UsageError(f"{flag} {_value(values[param.name])}: {text}")


# ------------------------------------------------------------------------------ batch options

_B = BatchSettings()

_BATCH = [
    argument(
        "inputs",
        list[str],
        ...,
        panel="Arguments",
        metavar="INPUT",
        show_default=False,
        help="Image files, folders, quoted globs ('photos/*.jpg'), or - to read paths from stdin.",
    ),
    option(
        "output",
        str,
        ...,
        "-o",
        "--output",
        panel=INPUT_OUTPUT,
        metavar="DIR",
        help="Folder for the results, or - to write the single result to stdout.",
    ),
    option("recursive", bool, _B.recursive, "-r", "--recursive", panel=INPUT_OUTPUT, help="Enter subfolders."),
    option(
        "name",
        str,
        _B.name,
        "--name",
        metavar="TEMPLATE",
        panel=INPUT_OUTPUT,
        help="Output name without extension; fields {stem}, {ext}, {scale}, {seed}, {steps}.",
    ),
    option(
        "format",
        OutputFormat,
        OutputFormat(_B.format),
        "-f",
        "--format",
        panel=INPUT_OUTPUT,
        help="Output format; same: the input's (BMP gives PNG).",
    ),
    # Not "[default: ...]" in the text: Rich would take it for markup and drop it.
    option(
        "quality",
        Optional[int],
        _B.quality,
        "--quality",
        metavar="Q",
        panel=INPUT_OUTPUT,
        show_default=False,
        help="JPEG and WebP quality (default: " + ", ".join(f"{q} for {f}" for f, q in DEFAULT_QUALITY.items()) + ").",
    ),
    option(
        "on_exists",
        OnExists,
        OnExists(_B.on_exists),
        "--on-exists",
        panel=INPUT_OUTPUT,
        help="When an output exists (if-stale: made again when it was made with other settings; "
        "error: that input fails).",
    ),
    option(
        "retry_failed",
        bool,
        _B.retry_failed,
        "--retry-failed",
        panel=BATCH,
        help="Try again inputs that failed before and are unchanged since.",
    ),
    option("fail_fast", bool, _B.fail_fast, "--fail-fast", panel=BATCH, help="Stop at the first failed input."),
    option(
        "json_lines", bool, _B.json, "--json", panel=BATCH, help="One JSON object per input on stdout, then a summary."
    ),
    option("dry_run", bool, _B.dry_run, "--dry-run", panel=BATCH, help="Plan without loading any model."),
    option("quiet", bool, False, "-q", "--quiet", panel=BATCH, help="Only errors on stderr."),
    option("verbose", bool, False, "-v", "--verbose", panel=BATCH, help="Every step, skip and timing on stderr."),
    option(
        "lock",
        Optional[str],
        _B.lock,
        "--lock",
        panel=BATCH,
        metavar="FILE",
        show_default=False,
        help="Refuse to start while another run holds FILE (with a shard: FILE.I-of-N).",
    ),
    option(
        "shard",
        Optional[str],
        None,
        "--shard",
        panel=BATCH,
        metavar="I/N",
        show_default=False,
        help="Do only share I of N (0 <= I < N) of the planned work; torchrun's workers take theirs from RANK.",
    ),
    option(
        "peer_timeout",
        float,
        PEER_TIMEOUT,
        "--peer-timeout",
        panel=BATCH,
        metavar="SECONDS",
        help="Under torchrun: how long a silent worker is waited for before the others give up.",
    ),
    option(
        "max_pixels",
        int,
        _B.max_pixels,
        "--max-pixels",
        panel=BATCH,
        metavar="N",
        help="Refuse inputs whose output or working image (after --process-size) has more pixels.",
    ),
]


def _build_batch(
    inputs: list[str],
    output: str,
    recursive: bool,
    name: str,
    format: OutputFormat,
    quality: int | None,
    on_exists: OnExists,
    retry_failed: bool,
    fail_fast: bool,
    json_lines: bool,
    dry_run: bool,
    quiet: bool,
    verbose: bool,
    lock: str | None,
    shard: str | None,
    peer_timeout: float,
    max_pixels: int,
) -> BatchSettings:
    if quiet and verbose:
        raise UsageError("-q and -v contradict each other")
    world, share = _share(shard, peer_timeout)
    if not str(output).strip():  # `-o "$OUT"` with OUT unset must not mean the current folder
        raise UsageError("-o is empty", hint="name a folder for the results, or - for stdout")
    try:
        return BatchSettings(
            inputs=tuple(inputs),
            output=str(output),
            recursive=recursive,
            name=name,
            format=format.value,
            quality=quality,
            on_exists=on_exists.value,
            retry_failed=retry_failed,
            fail_fast=fail_fast,
            json=json_lines,
            dry_run=dry_run,
            verbosity=0 if quiet else 2 if verbose else 1,
            lock=lock,
            shard=share,
            world=world,
            max_pixels=max_pixels,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _share(shard: str | None, peer_timeout: float) -> tuple[World | None, Shard | None]:
    """The workers started together with this one, and this worker's shard: --shard, or its
    rank under torchrun."""
    if not peer_timeout > 0:
        raise UsageError(f"--peer-timeout {peer_timeout:g}: must be more than 0")
    world = launched_world(peer_timeout)
    if world is not None and world.size > 1:
        if shard is not None:
            raise UsageError(
                f"--shard {shard}: torchrun splits the work already (worker {world.rank} of {world.size})",
                hint="leave out --shard under torchrun, or start one pasd per shard without it",
            )
        return world, Shard(world.rank, world.size)
    if shard is None:
        return None, None
    try:
        return None, Shard.parse(shard)
    except ValueError as exc:
        raise UsageError(
            f"--shard {shard}: {str(exc).split(': ', 1)[-1]}", hint="e.g. --shard 0/4 ... --shard 3/4"
        ) from None


BATCH_OPTIONS = Group(_BATCH, _build_batch)


# ---------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelChoice:
    """Which models, where they are kept, and where they run."""

    pasd: str
    base: str
    offline: bool = False
    models_dir: Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    vae_memory_mb: int | None = None  # None: a share of the device's free memory
    compile: bool = False  # torch.compile the UNet and ControlNet
    local_rank: int | None = None  # under torchrun: CUDA means this worker's GPU, cuda:LOCAL_RANK
    exact: bool = False  # --exact: the released fp32 computation, every weight read into fp32


def model_options(pasd_default: str) -> Group:
    params = [
        option(
            "pasd",
            str,
            pasd_default,
            "-m",
            "-n",
            "--pasd",
            panel=MODEL,
            metavar="NAME|PATH",
            help="PASD model: a name from `pasd models list`, or a checkpoint folder.",
        ),
        option(
            "base",
            str,
            BASE_MODEL,
            "--base",
            panel=MODEL,
            metavar="NAME|PATH",
            help="Stable Diffusion 1.5: a model name, or a folder in diffusers layout.",
        ),
        option(
            "offline", bool, False, "--offline", panel=MODEL, help="Never use the network; fail if a model is missing."
        ),
        option("models_dir", Optional[Path], None, "--models-dir", panel=MODEL, metavar="DIR", help=MODELS_DIR_HELP),
        option(
            "device",
            str,
            Device.auto.value,
            "--device",
            panel=MODEL,
            metavar="<" + "|".join([*(d.value for d in Device), "cuda:N"]) + ">",
            help="Where the models run (auto: CUDA, MPS, CPU). Under torchrun CUDA is cuda:LOCAL_RANK.",
        ),
        option(
            "dtype",
            Dtype,
            Dtype.auto,
            "--dtype",
            panel=MODEL,
            help="Precision (auto: fp16 on GPUs; bf16 on CPUs with AVX512-BF16 or AMX, else fp32).",
        ),
        option(
            "vae_memory",
            Optional[int],
            None,
            "--vae-memory",
            panel=TILING,
            metavar="MB",
            show_default=f"{VAE_MEMORY_SHARE:.0%} of the free memory",
            help="What the VAE may use; decides automatic VAE tiling.",
        ),
        option(
            "compile",
            bool,
            False,
            "--compile",
            panel=MODEL,
            help="torch.compile the UNet and ControlNet: faster steps on GPUs after a first image that compiles "
            "(once per tile shape); the same result up to float rounding.",
        ),
    ]

    def build(
        pasd: str,
        base: str,
        offline: bool,
        models_dir: Path | None,
        device: str,
        dtype: Dtype,
        vae_memory: int | None,
        compile: bool,
    ) -> ModelChoice:
        if vae_memory is not None and vae_memory < 1:
            raise UsageError(f"--vae-memory {vae_memory}: must be at least 1 (MB)")
        chosen = device_choice(device)
        return ModelChoice(
            pasd, base, offline, models_dir, chosen, dtype.value, vae_memory, compile, launched_local_rank()
        )

    return Group(params, build)


# ------------------------------------------------------------------------------- diffusion


def diffusion_options(preset: Any, extra: Sequence[Param] = (), omit: Sequence[str] = ()) -> Group:
    """The engine's settings, defaults from `preset` (an instance of the command's settings class):
    the options of the fields it has, and `extra` options for fields of its own, building an
    object of its class. Fields in `omit` keep the preset's value and get no option."""
    d = UpscaleSettings() if not isinstance(preset, UpscaleSettings) else preset
    params = [
        option(
            "scale", float, d.scale, "-s", "--scale", metavar="S", panel=INPUT_OUTPUT, help="Output size / input size."
        ),
        option("steps", int, d.steps, "--steps", metavar="N", panel=DIFFUSION, help="Denoising steps."),
        option(
            "guidance",
            float,
            d.guidance,
            "--guidance",
            metavar="G",
            panel=DIFFUSION,
            help="Classifier-free guidance; <= 1: off.",
        ),
        option(
            "conditioning_scale",
            float,
            d.conditioning_scale,
            "--conditioning-scale",
            metavar="C",
            panel=DIFFUSION,
            help="Strength of the image condition.",
        ),
        option(
            "process_size",
            int,
            d.process_size,
            "--process-size",
            metavar="PIXELS",
            panel=DIFFUSION,
            help="Short side the model works at, at least.",
        ),
        option(
            "added_noise_level",
            int,
            d.added_noise_level,
            "--added-noise-level",
            metavar="L",
            panel=DIFFUSION,
            help="Timestep of the noise added to the initial latent (0-999).",
        ),
        option("seed", int, d.seed, "--seed", metavar="N", panel=DIFFUSION, help="Seed of each image's random draws."),
        option("color_fix", ColorFix, ColorFix(d.color_fix), "--color-fix", panel=DIFFUSION, help="Colour correction."),
        option(
            "exact",
            bool,
            d.exact,
            "--exact",
            panel=DIFFUSION,
            help="Compute what the released script computes: fp32, its tiling (320/8, gaussian) and global "
            "VAE attention where left at auto, its prompt joining. For comparisons; the defaults are faster.",
        ),
        option(
            "prompt", str, d.prompt, "--prompt", metavar="TEXT", panel=PROMPTS, help="Text that describes every image."
        ),
        option(
            "added_prompt",
            str,
            d.added_prompt,
            "--added-prompt",
            metavar="TEXT",
            panel=PROMPTS,
            help="Appended to every prompt.",
        ),
        option(
            "negative_prompt",
            str,
            d.negative_prompt,
            "--negative-prompt",
            metavar="TEXT",
            panel=PROMPTS,
            help="What to avoid.",
        ),
        option(
            "latent_tile",
            str,
            d.latent_tile,
            "--latent-tile",
            metavar="N|auto",
            panel=TILING,
            help="Latent tile side (pixels / 8); auto: the fewest FLOPs, tiles of 64 or more (--exact: 320).",
        ),
        option(
            "latent_overlap",
            str,
            d.latent_overlap,
            "--latent-overlap",
            metavar="N|auto",
            panel=TILING,
            help="Latent tile overlap; auto: at least 8, spread evenly (8 with a given tile).",
        ),
        option(
            "latent_blend",
            LatentBlend,
            LatentBlend(d.blend or AUTO),
            "--latent-blend",
            panel=TILING,
            help="gaussian: as released; ramp: cross-fade over the whole overlap; auto: ramp (--exact: gaussian).",
        ),
        option(
            "tile_batch",
            str,
            d.tile_batch,
            "--tile-batch",
            metavar="N|auto",
            panel=TILING,
            help="Latent tiles per forward pass; auto: as many as memory holds on CUDA, else 1 (--exact: 1).",
        ),
        option(
            "vae_tile",
            Optional[int],
            d.vae_tile,
            "--vae-tile",
            panel=TILING,
            metavar="PIXELS",
            show_default="auto",
            help="VAE tile side; 0 = whole image. Exact either way.",
        ),
        option(
            "vae_attention_window",
            str,
            d.vae_attention_window,
            "--vae-attention-window",
            metavar="N|auto",
            panel=TILING,
            help="Approximate the VAE's attention within this many latent pixels; 0 = exact; auto: exact "
            "except on the CPU where it would cost more than the rest of the VAE (--exact: 0).",
        ),
    ]

    has = {f.name for f in fields(preset)}
    params = [p for p in params if ("blend" if p.name == "latent_blend" else p.name) in has - set(omit)]
    for p in params:  # defaults from `preset`, also for a settings class of another shape
        field_name = "blend" if p.name == "latent_blend" else p.name
        value = getattr(preset, field_name)
        if p.name in AUTO_NUMBERS:
            value = AUTO if value is None else str(value)
        p.declaration.default = p.annotation(value or AUTO) if p.choices is not None else value
    params += list(extra)

    def build(**values: Any) -> Any:
        given = {"blend" if name == "latent_blend" else name: _value(value) for name, value in values.items()}
        for p in params:
            if p.name in AUTO_NUMBERS:
                given[p.name] = auto_number(p.flags[-1], given[p.name])
        try:
            return replace(preset, **given)
        except ValueError as exc:
            renamed = [replace(p, name="blend") if p.name == "latent_blend" else p for p in params]
            raise setting_error(exc, renamed, given) from None

    assert {p.name for p in params} | {"blend", *omit} >= has, (
        f"engine settings without an option: {has - {p.name for p in params}}"
    )
    return Group(params, build)


# ----------------------------------------------------------------------------------- prompts

_C = CaptionSettings()

_PROMPTS = [
    option(
        "caption",
        Optional[CaptionMode],
        None,
        "--caption",
        panel=PROMPTS,
        show_default=f"{_C.mode}; none when its model is not installed",
        help="Describe each original input: a BLIP caption, its ImageNet class (if p >= 0.1), or none.",
    ),
    option(
        "caption_model",
        Optional[str],
        None,
        "--caption-model",
        panel=PROMPTS,
        metavar="NAME|PATH",
        show_default=False,
        help=f"The captioner or classifier (default: {CAPTION_MODEL}; {CLASSIFY_MODEL} for classify).",
    ),
    option(
        "prompt_file",
        Optional[Path],
        None,
        "--prompt-file",
        panel=PROMPTS,
        metavar="CSV",
        show_default=False,
        help="Rows of file,prompt: that image's description, in place of its caption.",
    ),
    option(
        "sidecars",
        bool,
        True,
        "--sidecars/--no-sidecars",
        panel=PROMPTS,
        help="photo.txt beside photo.jpg describes it, in place of its caption.",
    ),
    option(
        "caption_only",
        bool,
        False,
        "--caption-only",
        panel=PROMPTS,
        help="With --dry-run: print each image's description as --prompt-file CSV (never loads PASD).",
    ),
]


def _build_prompts(
    caption: CaptionMode | None, caption_model: str | None, prompt_file: Path | None, sidecars: bool, caption_only: bool
) -> PromptChoice:
    # Without --caption (and --caption-model), a run whose captioner is not installed goes on
    # without captions, with a warning: the README's local-folder runs need no store at all.
    # --caption-only asks for the descriptions themselves: there a missing captioner is an error.
    optional = caption is None and caption_model is None and not caption_only
    mode = _C.mode if caption is None else caption.value
    return PromptChoice(CaptionSettings(mode=mode), caption_model, prompt_file, sidecars, caption_only, optional)


PROMPT_OPTIONS = Group(_PROMPTS, _build_prompts)


# ------------------------------------------------------------------------------ stylization


# --fast, for upscale and stylize alike.
FAST_OPTION = option(
    "fast",
    bool,
    False,
    "--fast",
    panel=MODEL,
    help=f"The LCM-LoRA ({LCM_LORA}) fused into the UNet, with the LCM scheduler: {FAST_STEPS} steps and "
    f"guidance {FAST_GUIDANCE:g} (one model pass per step) unless --steps / --guidance are given. Lossy.",
)
FAST_OPTIONS = Group([FAST_OPTION], lambda fast: fast)


@dataclass(frozen=True)
class StyleChoice:
    """`pasd stylize`'s personalized base and what is merged into it."""

    style: str
    loras: tuple[LoraSpec, ...] = ()
    blend: float = BASE_BLEND
    fast: bool = False
    trust_pickle: bool = False


_STYLE = [
    option(
        "style",
        str,
        ...,
        "--style",
        panel=MODEL,
        metavar="BASE",
        show_default=False,
        help="The personalized SD 1.5 base: a .safetensors checkpoint (civitai / LDM layout), a diffusers "
        "folder, a UNet folder, a model name, or a hub repo id (owner/name).",
    ),
    option(
        "lora",
        list[str],
        [],
        "--lora",
        panel=MODEL,
        metavar="FILE[:WEIGHT]",
        show_default=False,
        help="A LoRA merged at WEIGHT (default 1); repeatable, applied in order.",
    ),
    option(
        "style_blend",
        float,
        BASE_BLEND,
        "--blend",
        metavar="A",
        panel=MODEL,
        help="Weight of the style's UNet against SD 1.5's: 1 replaces it, 0 keeps it.",
    ),
    FAST_OPTION,
    option(
        "trust_pickle",
        bool,
        False,
        "--trust-pickle",
        panel=MODEL,
        help="Read pickled weights (.ckpt, .pt, .bin) with restricted unpickling; refused otherwise.",
    ),
]


def _build_style(style: str, lora: list[str], style_blend: float, fast: bool, trust_pickle: bool) -> StyleChoice:
    if not 0.0 <= style_blend <= 1.0:  # checked by the engine only once the models are loaded
        raise UsageError(f"--blend {style_blend:g}: must be in [0, 1]")
    try:
        loras = tuple(LoraSpec.parse(text) for text in lora)
    except ValueError as exc:
        raise UsageError(f"--lora: {exc}") from None
    return StyleChoice(style, loras, style_blend, fast, trust_pickle)


STYLE_OPTIONS = Group(_STYLE, _build_style)

# ---------------------------------------------------------------------------------- colorize

# Fields of ColorizeSettings with no option: the output keeps the input's size, gets no colour
# fix (it would pull the colours back to grey), and nothing is appended to the prompt, as released.
COLORIZE_FIXED = ("scale", "color_fix", "added_prompt")
# Colorization always works at the process size, reducing larger inputs (as released).
COLORIZE_PROCESS_SIZE_HELP = "Short side the model works at, for every input (long side at most twice)."

LUMA_OPTION = option(
    "luma",
    Luma,
    Luma.exact,
    "--luma",
    panel=DIFFUSION,
    help="exact: the output's luma is the input's (colours that would clip lose saturation); "
    "released: the released merge, which clips and can shift brightness.",
)

_COLORIZE = [
    option(
        "force",
        bool,
        False,
        "--force",
        panel=INPUT_OUTPUT,
        help="Colorize colour inputs too (from their luma; their own colours are lost). Refused otherwise.",
    )
]


def _build_colorize(force: bool) -> bool:
    return force


def colorize_settings_options() -> Group:
    """`pasd colorize`'s engine settings: upscale's options with the same meanings, less the
    fixed fields, plus --luma."""
    group = diffusion_options(ColorizeSettings(), extra=[LUMA_OPTION], omit=COLORIZE_FIXED)
    for param in group.params:
        if param.name == "process_size":
            param.declaration.help = COLORIZE_PROCESS_SIZE_HELP
    return group


COLORIZE_OPTIONS = Group(_COLORIZE, _build_colorize)

# Options whose value is one of a set, by parameter name: the command line's error for a value
# outside the set lists them.
CHOICES = {
    p.name: p.choices
    for p in (
        *_BATCH,
        *model_options("").params,
        *diffusion_options(UpscaleSettings()).params,
        *_PROMPTS,
        LUMA_OPTION,
    )
    if p.choices is not None
}
