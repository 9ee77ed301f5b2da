"""`pasd stylize`'s own options (the personalized base, LoRAs, blend, fast mode, pickles), the
checks that refuse a bad base before anything heavy is loaded, and the steps that turn the
options into local files and a metadata record.

Where a `--base BASE` comes from, in this order: an existing file or folder; a model name from
`models/` (kind `base`); a hub repo id `owner/name` (fetched into the store, `hub_bases.py`).
A `--lora` is a file or a model name of kind `lora`. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import typer

from ..batch import settings as defaults
from ..engine.formats import SAFETENSORS_SUFFIXES, check_base, check_lora_file
from ..errors import ModelError, UsageError
from .diffusion import ModelChoice, resolve_model_dirs
from .option_groups import option_group

SD15_HELP = (
    "Stable Diffusion 1.5 (a model name, or a folder in diffusers layout): the tokenizer and "
    "scheduler, and the VAE and text encoder when BASE has none."
)
PATH, STORE, HUB = "path", "store", "hub"


@dataclass(frozen=True)
class StyleChoice:
    base: str
    loras: tuple[defaults.LoraSpec, ...]
    blend: float
    fast: bool
    trust_pickle: bool


_PARAMETERS = [
    (
        "base",
        typer.Option(
            ...,
            "--base",
            metavar="BASE",
            show_default=False,
            help="The personalized SD 1.5 base: a .safetensors checkpoint (civitai / LDM "
            "layout), a diffusers folder, a UNet folder, a model name, or a hub repo "
            "id (owner/name).",
        ),
        str,
    ),
    (
        "lora",
        typer.Option(
            [],
            "--lora",
            metavar="FILE[:WEIGHT]",
            show_default=False,
            help="A LoRA (kohya or diffusers keys; alpha/rank honoured) merged at WEIGHT (default 1). Repeatable.",
        ),
        list[str],
    ),
    # Not `blend`: that name is the latent tiles' blend in the shared diffusion settings.
    (
        "base_blend",
        typer.Option(
            defaults.BASE_BLEND,
            "--blend",
            min=0.0,
            max=1.0,
            help="Weight of the base's UNet against SD 1.5's: 1 replaces it, 0 keeps it "
            "(the base's VAE and text encoder are used either way).",
        ),
        float,
    ),
    (
        "fast",
        typer.Option(
            False,
            "--fast",
            help=f"The LCM-LoRA ({defaults.LCM_LORA}) with the LCM scheduler: "
            f"{defaults.FAST_STEPS} steps and guidance {defaults.FAST_GUIDANCE:g} "
            "unless --steps / --guidance are given.",
        ),
        bool,
    ),
    (
        "trust_pickle",
        typer.Option(
            False,
            "--trust-pickle",
            help="Read pickled weights (.ckpt, .pt, .bin) with restricted unpickling; refused otherwise.",
        ),
        bool,
    ),
]


def build_style(base: str, lora: list[str], base_blend: float, fast: bool, trust_pickle: bool) -> StyleChoice:
    try:
        loras = tuple(defaults.LoraSpec.parse(text) for text in lora)
    except ValueError as exc:
        raise UsageError(f"--lora: {exc}") from None
    return StyleChoice(base, loras, base_blend, fast, trust_pickle)


# Replaces a command's `style` parameter with the stylize options, packed into a `StyleChoice`.
style_options = option_group("style", _PARAMETERS, build_style)


def fast_settings(run_settings: defaults.StylizeSettings, given: Callable[[str], bool]):
    """--fast's steps and guidance, where the user did not choose them (`given(option name)`)."""
    return replace(
        run_settings,
        steps=run_settings.steps if given("steps") else defaults.FAST_STEPS,
        guidance=run_settings.guidance if given("guidance") else defaults.FAST_GUIDANCE,
    )


def given_on_command_line(ctx) -> Callable[[str], bool]:
    def given(name: str) -> bool:
        source = ctx.get_parameter_source(name)
        return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")

    return given


# --- where a base or a LoRA comes from --------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    spec: str
    origin: str  # PATH, STORE or HUB
    path: Path | None = None


def base_source(spec: str, manifests: Mapping) -> Source:
    from ..store.hub_bases import is_repo_id

    path = Path(spec).expanduser()
    if path.exists():
        return Source(spec, PATH, path)
    if spec in manifests:
        kind = manifests[spec].kind
        if kind != "base":
            raise ModelError(
                f"--base {spec}: '{spec}' is a {kind} model, not a base",
                hint="pass a LoRA with --lora" if kind == "lora" else None,
            )
        if not {"unet/config.json", "config.json"} & set(manifests[spec].files):
            raise ModelError(f"--base {spec}: '{spec}' has no UNet (it serves as --sd15); name a personalized base")
        return Source(spec, STORE)
    if is_repo_id(spec):
        return Source(spec, HUB)
    raise ModelError(f"--base {spec}: no such file or folder, model name, or hub repo id (owner/name)")


def lora_source(spec: str, manifests: Mapping) -> Source:
    path = Path(spec).expanduser()
    if not path.exists() and spec in manifests:
        if manifests[spec].kind != "lora":
            raise ModelError(f"--lora {spec}: '{spec}' is a {manifests[spec].kind} model, not a LoRA")
        return Source(spec, STORE)
    return Source(spec, PATH, path)


def preflight(style: StyleChoice) -> None:
    """The checks that need no weights, for the files named on the command line: run before any
    input is looked at, so a refused base (a pickle, a LoRA, SDXL, a missing file) costs nothing
    and runs nothing. Store models and hub bases are checked once they are local."""
    from ..store.local import load_manifests

    manifests = load_manifests()
    base = base_source(style.base, manifests)
    if base.origin == PATH:
        check_base(base.path, style.trust_pickle)
    for spec in style.loras:
        source = lora_source(spec.path, manifests)
        if source.origin == PATH:
            check_lora_file(source.path, style.trust_pickle)


@dataclass(frozen=True)
class StyleFiles:
    pasd: Path
    sd15: Path
    base: Path
    loras: tuple[defaults.LoraSpec, ...]  # with local file paths
    lcm_lora: Path | None


def _lora_file(folder: Path, manifest) -> Path:
    """The weights file of a LoRA model in the store."""
    weights = [f for f in manifest.files if f.lower().endswith(SAFETENSORS_SUFFIXES)]
    if len(weights) != 1 or manifest.entry:
        raise ModelError(f"bad model manifest {manifest.name}: a LoRA lists exactly one .safetensors file and no entry")
    return folder / weights[0]


def resolve_style(style: StyleChoice, models: ModelChoice, say) -> StyleFiles:
    """Every model the run needs as a local path: store models resolved together (one error names
    all that are missing), then a hub base; each checked as `preflight` checks local files."""
    from ..store.local import load_manifests, runs_at_terminal

    manifests = load_manifests()
    base = base_source(style.base, manifests)
    loras = [(spec, lora_source(spec.path, manifests)) for spec in style.loras]
    wanted = [(base.spec, "--base")] if base.origin == STORE else []
    wanted += [(source.spec, "--lora") for _, source in loras if source.origin == STORE]
    if style.fast:
        wanted.append((defaults.LCM_LORA, "--fast"))
    pasd_dir, sd15_dir, *found = resolve_model_dirs(models, say, wanted)
    found = dict(zip([spec for spec, _ in wanted], found))
    if base.origin == HUB:
        from ..store.hub_bases import ensure_hub_base

        base_path = ensure_hub_base(
            base.spec, models_dir=models.models_dir, offline=models.offline, interactive=runs_at_terminal(), say=say
        )
    else:
        base_path = base.path if base.origin == PATH else found[base.spec]
    check_base(base_path, style.trust_pickle)
    lora_files = []
    for spec, source in loras:
        path = source.path if source.origin == PATH else _lora_file(found[source.spec], manifests[source.spec])
        check_lora_file(path, style.trust_pickle)
        lora_files.append(replace(spec, path=str(path)))
    lcm = _lora_file(found[defaults.LCM_LORA], manifests[defaults.LCM_LORA]) if style.fast else None
    return StyleFiles(pasd_dir, sd15_dir, base_path, tuple(lora_files), lcm)


# --- what the outputs record ----------------------------------------------------------------------


def style_identity(model: dict, style: StyleChoice, report) -> dict:
    """The model identity of `diffusion_cli.model_identity` (its `base` is SD 1.5 here), plus the
    personalized base, the LoRAs and the LCM-LoRA, from the engine's report of what it applied."""
    identity = {k: v for k, v in model.items() if k != "base"}
    identity["sd15"] = model["base"]
    identity["base"] = {
        "spec": style.base,
        "path": str(report.base.source),
        "kind": report.base.kind,
        "blend": report.base.blend,
        "replaced": list(report.base.replaced),
    }
    identity["loras"] = [{"path": str(lora.source), "weight": lora.weight} for lora in report.loras]
    identity["lcm_lora"] = str(report.lcm.source) if report.lcm else None
    return identity


def stylize_record(run_settings: defaults.StylizeSettings, identity: dict) -> dict:
    return {"command": "stylize", "settings": asdict(run_settings), "model": identity}
