"""Stylization: the Real-ISR model on a personalized base, with LoRAs and the LCM fast mode
(spec section 6), applied in place to loaded components in a fixed order: base, LoRAs, LCM-LoRA."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .bases import BaseReport, apply_base
from .loading import Components
from .lora import LoraReport, apply_lora
from .schedulers import SeededLCMScheduler
from .settings import BASE_BLEND, LoraSpec

# on_stage(what, source): called before each part is applied ("base", "lora", "lcm").
StageCallback = Callable[[str, Path], None]


@dataclass(frozen=True)
class PersonalizeReport:
    base: BaseReport | None = None
    loras: tuple[LoraReport, ...] = field(default=())
    lcm: LoraReport | None = None


# The LCM-LoRA is fused at full strength.
LCM_WEIGHT = 1.0


def use_lcm(components: Components, lcm_lora: Path, trust_pickle: bool = False) -> LoraReport:
    """Fast mode: fuse the LCM-LoRA at full strength and sample with the LCM scheduler. Into a
    UNet read with it already merged (`Components.unet_merged`), its text-encoder layers only."""
    unet_merged = (Path(lcm_lora), LCM_WEIGHT) in components.unet_merged
    report = apply_lora(components, Path(lcm_lora), LCM_WEIGHT, trust_pickle, unet=not unet_merged)
    components.scheduler_class = SeededLCMScheduler
    return report


def personalize(
    components: Components,
    base: Path | None = None,
    blend: float = BASE_BLEND,
    loras: Sequence[LoraSpec] = (),
    lcm_lora: Path | None = None,
    trust_pickle: bool = False,
    on_stage: StageCallback | None = None,
) -> PersonalizeReport:
    def stage(what: str, source) -> None:
        if on_stage:
            on_stage(what, Path(source))

    base_report = None
    if base is not None:
        stage("base", base)
        base_report = apply_base(components, Path(base), blend, trust_pickle)
    lora_reports = []
    for spec in loras:
        stage("lora", spec.path)
        lora_reports.append(apply_lora(components, Path(spec.path), spec.weight, trust_pickle))
    lcm_report = None
    if lcm_lora is not None:
        stage("lcm", lcm_lora)
        lcm_report = use_lcm(components, Path(lcm_lora), trust_pickle)
    return PersonalizeReport(base_report, tuple(lora_reports), lcm_report)
