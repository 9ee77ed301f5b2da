"""`pasd stylize`: the PASD model on a personalized Stable Diffusion 1.5 base (`--style`: a
civitai checkpoint, a DreamBooth folder, a model name or a hub repo), with LoRAs and the LCM fast
mode (spec section 6). `--base` is SD 1.5, as in every command.

A style named on the command line is checked before anything heavy is loaded (a pickle, a LoRA,
SDXL, a missing file); one from the store or the hub once it is local. Nothing here imports torch
before the pipeline loads.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import typer

from ..batch.prompt_pass import PromptChoice
from ..batch.report import Reporter
from ..batch.settings import BatchSettings
from ..engine.formats import check_base, check_lora_file
from ..engine.settings import StylizeSettings
from ..store import LCM_LORA, STYLIZE_PASD, Kind, ModelRef, Origin, Resolution, load_manifests, locate
from .diffusion import DiffusionCommand, fast_settings, given_on_command_line, run
from .option_groups import with_options
from .options import (
    BATCH_OPTIONS,
    PROMPT_OPTIONS,
    STYLE_OPTIONS,
    ModelChoice,
    StyleChoice,
    diffusion_options,
    model_options,
)
from .runtime import Runtime

if TYPE_CHECKING:
    from ..engine import PersonalizeReport
    from ..engine.pipeline import PASDPipeline


class StylizeCommand(DiffusionCommand):
    name = "stylize"

    def __init__(
        self,
        settings: StylizeSettings,
        models: ModelChoice,
        prompts: PromptChoice,
        batch: BatchSettings,
        style: StyleChoice,
    ):
        super().__init__(settings, models, prompts, batch)
        self.style = style
        self.style_ref = ModelRef(style.style, Kind.STYLE, "--style")
        self.lora_refs = [ModelRef(spec.path, Kind.LORA, "--lora") for spec in style.loras]
        self.lcm_ref = ModelRef(LCM_LORA, Kind.LORA, "--fast") if style.fast else None
        self._preflight()

    def _preflight(self) -> None:
        """The checks that need no weights, for the files named on the command line: run before any
        input is looked at, so a refused style (a pickle, a LoRA, SDXL, a missing file) costs
        nothing and runs nothing. Store models and hub bases are checked once they are local."""
        manifests = load_manifests()
        style = locate(self.style_ref, manifests)
        if style.origin is Origin.PATH and style.path is not None:
            check_base(style.path, self.style.trust_pickle)
        for ref in self.lora_refs:
            lora = locate(ref, manifests)
            if lora.origin is Origin.PATH and lora.path is not None:
                check_lora_file(lora.path, self.style.trust_pickle)

    def model_refs(self) -> list[ModelRef]:
        extra = [self.lcm_ref] if self.lcm_ref is not None else []
        return [*super().model_refs(), self.style_ref, *self.lora_refs, *extra]

    def fingerprint_extra(self) -> dict[str, Any]:
        """Beyond the models (the style, the LoRAs and --fast's LCM-LoRA are among them)."""
        return {"style": {"blend": self.style.blend, "lora_weights": [lora.weight for lora in self.style.loras]}}

    def resolve(self, reporter: Reporter, dry_run: bool) -> None:
        super().resolve(reporter, dry_run)
        if dry_run:
            return
        assert self.resolution is not None
        check_base(self.resolution.path(self.style_ref), self.style.trust_pickle)
        for ref in self.lora_refs:
            check_lora_file(self.resolution.path(ref), self.style.trust_pickle)

    def load_pipeline(
        self, models: Resolution, runtime: Runtime, reporter: Reporter
    ) -> tuple[PASDPipeline, dict[str, Any]]:
        from ..engine import load_stylize_pipeline

        loras = tuple(replace(spec, path=str(models.path(ref))) for spec, ref in zip(self.style.loras, self.lora_refs))
        # On the CPU in float32, before the move to the device: merges are exact and cost no VRAM.
        pipeline, report = load_stylize_pipeline(
            models.path(self.pasd_ref),
            models.path(self.base_ref),
            models.path(self.style_ref),
            blend=self.style.blend,
            loras=loras,
            lcm_lora=models.path(self.lcm_ref) if self.lcm_ref is not None else None,
            trust_pickle=self.style.trust_pickle,
            device=runtime.device,
            dtype=runtime.dtype,
            on_stage=lambda what, source: reporter.info(f"applying {what} {source}"),
            keep_half_weights=runtime.half_weights,
            bf16_vae=self.lcm_ref is not None,
        )
        return pipeline, self._identity_of(report, str(models.path(self.base_ref)))

    def _identity_of(self, report: PersonalizeReport, sd15: str) -> dict[str, Any]:
        """What the outputs record beyond PASD: SD 1.5 (`sd15`), the style (`base`, as the record
        has always called it), the LoRAs and the LCM-LoRA, from the engine's report."""
        base = report.base
        assert base is not None  # a style is always applied
        return {
            "sd15": sd15,
            "base": {
                "spec": self.style.style,
                "path": str(base.source),
                "kind": base.kind,
                "blend": base.blend,
                "replaced": list(base.replaced),
            },
            "loras": [{"path": str(lora.source), "weight": lora.weight} for lora in report.loras],
            "lcm_lora": str(report.lcm.source) if report.lcm else None,
        }


@with_options(
    batch=BATCH_OPTIONS,
    models=model_options(STYLIZE_PASD),
    settings=diffusion_options(StylizeSettings()),
    prompts=PROMPT_OPTIONS,
    style=STYLE_OPTIONS,
)
def stylize(
    ctx: typer.Context,
    batch: BatchSettings,
    models: ModelChoice,
    settings: StylizeSettings,
    prompts: PromptChoice,
    style: StyleChoice,
) -> None:
    """Stylize images: PASD on a personalized Stable Diffusion 1.5 base (--style), with LoRAs.

    Defaults follow the authors' advice: PASD-light, conditioning scale 0.7 (smaller is more stylized), scale 1.

    The style's stock UNet weights, VAE and text encoder are used; PASD's own layers always stay.
    """
    if style.fast:
        settings = fast_settings(settings, given_on_command_line(ctx))
    run(StylizeCommand(settings, models, prompts, batch, style), batch)
