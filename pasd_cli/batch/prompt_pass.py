"""The pre-pass that gives every image its prompt before the diffusion model loads (spec section
5): a sidecar file, the --prompt-file CSV, the captioner (through the cache), or nothing.

It runs after the command's models are resolved (a missing one is not found after an hour of
captioning), resolves every pending image's prompt, then frees the captioner, so the captioner
and PASD are never in memory together. The describer's weights are needed only when some image
must actually be captioned: its reference is lazy (see `store.resolve`).
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from ..engine.settings import CaptionSettings, UpscaleSettings
from ..errors import InputError, UsageError
from ..store import (
    CAPTION_MODEL,
    CLASSIFY_MODEL,
    Kind,
    ModelRef,
    Resolution,
    fetch_command,
    load_manifests,
    locate,
    may_download,
)
from .command import Pending
from .plan import Job
from .report import Reporter

if TYPE_CHECKING:
    from ..prompts.cache import CaptionCache
    from ..prompts.sources import ImagePrompt, PromptFile, PromptResolver

# The store kind and the default model of each --caption mode that uses a model.
DESCRIBER_KINDS = {"blip": Kind.CAPTIONER, "classify": Kind.CLASSIFIER}
DESCRIBER_MODELS = {"blip": CAPTION_MODEL, "classify": CLASSIFY_MODEL}


class Runtime(Protocol):
    """Where a model runs, as the command line chose it."""

    @property
    def device(self) -> Any: ...

    @property
    def dtype(self) -> Any: ...

    @property
    def label(self) -> str: ...


@dataclass(frozen=True)
class PromptChoice:
    """What the prompt options ask for."""

    settings: CaptionSettings
    model: str | None = None  # --caption-model: a name or a folder; None: the mode's default
    prompt_file: Path | None = None
    sidecars: bool = True
    caption_only: bool = False
    # The mode is the default, not asked for: when its model is neither installed nor fetchable,
    # images go undescribed (as with --caption none), with a warning, instead of an error.
    optional: bool = False


class PromptRule(Protocol):
    """How a command builds the positive prompt from the settings and an image's description."""

    def __call__(
        self, user_prompt: str, added_prompt: str, caption: str | None = None, label: str | None = None
    ) -> str: ...


class ImagePrompts:
    """Every image's high-level information for one batch: filled by `prepass`, read by the
    command's transform through `for_job`. `rule` builds the prompt the records show (default:
    upscale's)."""

    def __init__(
        self,
        choice: PromptChoice,
        settings: UpscaleSettings,
        dry_run: bool,
        json_lines: bool,
        rule: PromptRule | None = None,
    ):
        if choice.caption_only and not dry_run:
            raise UsageError("--caption-only prints prompts instead of running the model; it needs --dry-run")
        mode = choice.settings.mode
        if choice.model is not None and mode == "none":
            raise UsageError("--caption-model needs --caption blip or --caption classify")
        self.choice, self.settings, self.dry_run, self.json_lines = choice, settings, dry_run, json_lines
        self.rule = rule
        self.prompt_file: PromptFile | None = None
        if choice.prompt_file is not None:  # refused before any work when malformed
            from ..prompts.sources import PromptFile

            self.prompt_file = PromptFile.read(choice.prompt_file)
        self.describer_ref: ModelRef | None = None
        if mode != "none":
            spec = choice.model or DESCRIBER_MODELS[mode]
            self.describer_ref = ModelRef(spec, DESCRIBER_KINDS[mode], "--caption-model", lazy=True)
            locate(self.describer_ref, load_manifests())  # an unknown name fails before any work
        self._prompts: dict[Path, ImagePrompt] = {}

    def refs(self) -> list[ModelRef]:
        """The describer, for the command's one resolution: lazy, so it is fetched or refused only
        when some image must be described. A dry run needs it only with --caption-only."""
        if self.describer_ref is None or (self.dry_run and not self.choice.caption_only):
            return []
        return [self.describer_ref]

    def for_job(self, job: Job) -> ImagePrompt:
        """The job's `ImagePrompt`: `.pipeline_args()` for the engine, `.provenance()` for the
        output's metadata (the JSON record gets its fields from the pre-pass)."""
        try:
            return self._prompts[job.source]
        except KeyError:
            raise RuntimeError(f"no prompt was prepared for {job.source}") from None

    def record_fields(self, chosen: ImagePrompt) -> dict[str, Any]:
        """What the image's JSON record says about its prompt (dry runs included)."""
        s = self.settings
        prompt = (
            chosen.build(s.prompt, s.added_prompt)
            if self.rule is None
            else self.rule(s.prompt, s.added_prompt, **chosen.pipeline_args())
        )
        return {"prompt": prompt, **chosen.to_json()}

    # ----------------------------------------------------------------------------- the pre-pass

    def prepass(self, pending: Pending, models: Resolution, runtime: Callable[[], Runtime], store_root: Path) -> None:
        """A dry run resolves prompts only with --caption-only. `models` holds the describer's
        reference (see `refs`); `runtime()` says where it runs; captions are cached under
        `store_root`/captions."""
        if pending.dry_run and not self.choice.caption_only:
            return
        from ..imageio import read_rgb
        from ..prompts.sources import SidecarError

        reporter = pending.reporter
        if self.describer_ref is not None and self.choice.optional and not _obtainable(models, self.describer_ref):
            spec = self.describer_ref.spec
            reporter.warn(
                f"the default captioner ({spec}) is not installed, so images are not described (as with "
                f"--caption none); fetch it with `{fetch_command([spec], models.store.root)}`, or pass "
                "--caption none to say so"
            )
            self.describer_ref = None
        resolver, cache = self._resolver(reporter, models, runtime, store_root)
        rows = _PromptCsv(reporter.stdout) if self.choice.caption_only and not self.json_lines else None
        finished = False
        try:
            for index, job in enumerate(pending.jobs):
                try:
                    chosen = resolver.resolve(job.source, functools.partial(read_rgb, job.source))
                except InputError as exc:
                    if pending.fail(job, exc, remember=not isinstance(exc, SidecarError)):
                        break
                    continue
                self._prompts[job.source] = chosen
                job.extra.update(self.record_fields(chosen))
                self._report(reporter, job, chosen, rows)
                if chosen.description is not None:
                    reporter.progress("caption", index + 1, len(pending.jobs))
            else:
                finished = True
        finally:
            resolver.close()  # before the diffusion model loads
            reporter.end_stage("caption")
        if rows is not None and finished:
            rows.finish()
        self._after(pending, resolver, cache, finished)

    def _resolver(
        self, reporter: Reporter, models: Resolution, runtime: Callable[[], Runtime], store_root: Path
    ) -> tuple[PromptResolver, CaptionCache | None]:
        from ..prompts.cache import CaptionCache
        from ..prompts.sources import PromptResolver

        use_sidecars = self.choice.sidecars
        if self.describer_ref is None:
            return PromptResolver("none", prompt_file=self.prompt_file, use_sidecars=use_sidecars), None
        from .describer import ResolvedDescriber

        where = runtime()
        mode = self.choice.settings.mode
        describer = ResolvedDescriber(
            mode, models, self.describer_ref, self.choice.settings, reporter.info, where.label
        )
        cache = CaptionCache(store_root / "captions")
        resolver = PromptResolver(
            mode,
            describer,
            device=where.device,
            dtype=where.dtype,
            prompt_file=self.prompt_file,
            cache=cache,
            use_sidecars=use_sidecars,
        )
        return resolver, cache

    def _report(self, reporter: Reporter, job: Job, chosen: ImagePrompt, rows: _PromptCsv | None) -> None:
        cached = " (cached)" if chosen.cached else ""
        line = f"prompt {job.source} [{chosen.source}{cached}]: {job.extra['prompt']}"
        if self.choice.caption_only:
            reporter.info(line)
        else:
            reporter.debug(line)
        if rows is not None and chosen.source != "sidecar":  # a sidecar is edited where it is
            rows.write(job.source, chosen)

    def _after(self, pending: Pending, resolver: PromptResolver, cache: CaptionCache | None, finished: bool) -> None:
        stats = resolver.stats.to_json()
        stats["caption_cache_write_errors"] = cache.write_errors if cache is not None else 0
        pending.summary.extra["prompts"] = stats
        reporter = pending.reporter
        parts = [
            f"{stats['captions_computed']} captioned" if stats["captions_computed"] else "",
            f"{stats['caption_cache_hits']} from the caption cache" if stats["caption_cache_hits"] else "",
            f"{stats['sidecar']} from sidecars" if stats["sidecar"] else "",
            f"{stats['prompt_file']} from --prompt-file" if stats["prompt_file"] else "",
        ]
        if any(parts):
            reporter.info("prompts: " + ", ".join(p for p in parts if p))
        if cache is not None and cache.last_write_error:
            reporter.warn(f"{cache.last_write_error} (captions will be computed again next time)")
        if self.prompt_file is not None and finished:
            for job in pending.plan.jobs:  # skipped, or described by a sidecar: named on purpose, not a typo
                self.prompt_file.lookup(job.source)
            unused = self.prompt_file.unused()
            if unused:
                more = f" and {len(unused) - 3} more" if len(unused) > 3 else ""
                reporter.warn(f"--prompt-file {self.prompt_file.path}: no input matches {', '.join(unused[:3])}{more}")


def _obtainable(models: Resolution, ref: ModelRef) -> bool:
    """Whether the describer's files are there, or would be fetched when needed."""
    return models[ref].usable or may_download(models.offline, models.interactive)


class _PromptCsv:
    """--caption-only's stdout: a --prompt-file the user can review, edit and pass back. The text is
    what the prompt file would need to give the same description (a caption cleaned as the
    released code cleans it; a prompt file's text is used as written).

    Rows are kept until the pass is over: a run that stops (a missing captioner on the tenth
    image, an interrupt) writes nothing, not a header and some rows that look like a result."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.rows: list[list[str]] = [["file", "prompt"]]

    def write(self, source: Path, chosen: ImagePrompt) -> None:
        from ..engine.prompts import clean_caption

        text = chosen.text or ""
        if chosen.source == "blip":
            text = clean_caption(text)
        self.rows.append([str(source), text])

    def finish(self) -> None:
        csv.writer(self.stream, lineterminator="\n").writerows(self.rows)
        self.stream.flush()
