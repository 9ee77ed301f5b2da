"""The prompt options every PASD command shares (`--caption`, `--caption-model`, `--prompt-file`,
`--sidecars`, `--caption-only`), declared once, and the pre-pass that gives every image its
prompt before the diffusion model loads (spec section 5).

A command opts in with `@caption_options` beside the batch and diffusion groups and a
`captions: CaptionOptions` parameter, builds one `ImagePrompts`, and hands it to its transform
and to the batch runner:

    @app.command()
    @batch_options
    @diffusion_options(...)
    @caption_options
    def stylize(batch: BatchSettings, diffusion: DiffusionOptions, captions: CaptionOptions):
        prompts = ImagePrompts(captions, batch, diffusion)
        ...  # in the transform: chosen = prompts.for_job(job)
        ...  #   pipeline.upscale(rgb, settings, **chosen.pipeline_args()) -> extra fields
        ...  #   {"prompt": result.prompt, **chosen.provenance()}  (see upscale_job.upscale_transform)
        run_batch_command(batch, ..., prepass=prompts.prepass)

The pre-pass runs before the model loads: it checks the models are there (so a missing one is
not found after an hour of captioning; `check_models` for a command with more models than
--pasd and the base), resolves every pending image's prompt (sidecar > prompt file > caption,
through the cache > none), then frees the captioner, so the captioner and PASD are never in
memory together (always: the captioner has nothing left to do by then).
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from ..batch import settings as defaults
from ..cli.option_groups import option_group
from ..errors import InputError, UsageError

_C = defaults.CaptionSettings()


@dataclass(frozen=True)
class CaptionOptions:
    settings: defaults.CaptionSettings
    model: Optional[str]  # --caption-model: a name or a folder; None: the mode's default
    prompt_file: Optional[Path]
    sidecars: bool
    caption_only: bool


_PARAMETERS = [
    (
        "caption",
        typer.Option(
            _C.mode,
            "--caption",
            help="High-level information for the prompt, from the original input: blip "
            "(a caption), classify (its ImageNet class if p >= 0.1), or none.",
        ),
        str,
    ),
    (
        "caption_model",
        typer.Option(
            None,
            "--caption-model",
            metavar="NAME|PATH",
            show_default=False,
            help=f"The captioner or classifier: a model name or a folder (default: "
            f"{defaults.CAPTION_MODEL}; {defaults.CLASSIFY_MODEL} for classify).",
        ),
        Optional[str],
    ),
    (
        "prompt_file",
        typer.Option(
            None,
            "--prompt-file",
            metavar="CSV",
            show_default=False,
            help="Rows of file,prompt: that image's description, in place of its caption.",
        ),
        Optional[Path],
    ),
    (
        "sidecars",
        typer.Option(
            True,
            "--sidecars/--no-sidecars",
            help="photo.txt beside photo.jpg describes it, in place of its caption (before --prompt-file).",
        ),
        bool,
    ),
    (
        "caption_only",
        typer.Option(
            False,
            "--caption-only",
            help="With --dry-run: print each image's description as --prompt-file "
            "CSV (loads the captioner, never PASD).",
        ),
        bool,
    ),
]


def build_caption_options(caption, caption_model, prompt_file, sidecars, caption_only) -> CaptionOptions:
    try:
        settings = defaults.CaptionSettings(mode=caption.lower())
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return CaptionOptions(settings, caption_model, prompt_file, sidecars, caption_only)


# Replaces a command's `captions` parameter with the shared options, packed into `CaptionOptions`.
caption_options = option_group("captions", _PARAMETERS, build_caption_options)


class ImagePrompts:
    """Every image's high-level information for one batch: filled by `prepass`, read by the
    worker through `for_job`."""

    def __init__(
        self, options: CaptionOptions, batch: defaults.BatchSettings, diffusion, check_models: Optional[Callable] = None
    ):
        """`check_models(reporter)` finds (or fetches, or refuses) every model the command will
        load, before any captioning; by default the --pasd and base models. A command with more
        models (a style base, LoRAs) passes its own resolver, so a missing one is reported first."""
        if options.caption_only and not batch.dry_run:
            raise UsageError("--caption-only prints prompts instead of upscaling; it needs --dry-run")
        if options.model is not None and options.settings.mode == "none":
            raise UsageError("--caption-model needs --caption blip or --caption classify")
        self.options, self.batch = options, batch
        self.run_settings, self.models = diffusion.settings, diffusion.models
        self.check_models = check_models or self._check_pasd_models
        self.prompt_file = None
        if options.prompt_file is not None:  # refused before any work when malformed
            from ..prompts.sources import PromptFile

            self.prompt_file = PromptFile.read(options.prompt_file)
        self.describer = None
        if options.settings.mode != "none":
            from ..store.local import runs_at_terminal
            from .describer import StoreDescriber

            self.describer = StoreDescriber(
                options.settings.mode,
                options.model,
                options.settings,
                models_dir=self.models.models_dir,
                offline=self.models.offline,
                interactive=runs_at_terminal(),
            )
        self._prompts: dict[Path, object] = {}

    def for_job(self, job):
        """The job's `prompt_sources.ImagePrompt`: `.pipeline_args()` for the engine, `.provenance()`
        for the output's metadata (the JSON record gets its fields from the pre-pass)."""
        try:
            return self._prompts[job.source]
        except KeyError:
            raise RuntimeError(f"no prompt was prepared for {job.source}") from None

    def record_fields(self, chosen) -> dict:
        """What the image's JSON record says about its prompt (dry runs included)."""
        return {"prompt": chosen.build(self.run_settings.prompt, self.run_settings.added_prompt), **chosen.to_json()}

    # ----------------------------------------------------------------------------- the pre-pass

    def prepass(self, pending) -> None:
        """For `run_batch_command(prepass=...)`: a dry run only resolves prompts with --caption-only."""
        if self.batch.dry_run and not self.options.caption_only:
            return
        reporter = pending.reporter
        if not self.batch.dry_run:  # a missing model is not found after an hour of captioning
            self.check_models(reporter)
        from ..imageio.images import read_rgb
        from ..prompts.sources import SidecarError

        resolver, cache = self._resolver(reporter)
        rows = _PromptCsv(reporter.stdout) if self.options.caption_only and not self.batch.json else None
        finished = False
        try:
            for index, job in enumerate(pending.jobs):
                try:
                    chosen = resolver.resolve(job.source, lambda job=job: read_rgb(job.source))
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
        self._after(pending, resolver, cache, finished)

    def _check_pasd_models(self, reporter) -> None:
        from ..cli.diffusion import resolve_model_dirs

        resolve_model_dirs(self.models, reporter.info)

    def _resolver(self, reporter):
        from ..prompts.cache import CaptionCache
        from ..prompts.sources import PromptResolver

        use_sidecars = self.options.sidecars
        if self.describer is None:
            return PromptResolver("none", prompt_file=self.prompt_file, use_sidecars=use_sidecars), None
        from ..cli.diffusion import pick_runtime
        from ..store.local import store_root

        device, dtype = pick_runtime(self.models)
        self.describer.say = reporter.info
        cache = CaptionCache(store_root(self.models.models_dir) / "captions")
        return PromptResolver(
            self.options.settings.mode,
            self.describer,
            device=device,
            dtype=dtype,
            prompt_file=self.prompt_file,
            cache=cache,
            use_sidecars=use_sidecars,
        ), cache

    def _report(self, reporter, job, chosen, rows) -> None:
        cached = " (cached)" if chosen.cached else ""
        line = f"prompt {job.source} [{chosen.source}{cached}]: {job.extra['prompt']}"
        if self.options.caption_only:
            reporter.info(line)
        else:
            reporter.debug(line)
        if rows is not None and chosen.source != "sidecar":  # a sidecar is edited where it is
            rows.write(job.source, chosen)

    def _after(self, pending, resolver, cache, finished: bool) -> None:
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


class _PromptCsv:
    """--caption-only's stdout: a --prompt-file the user can review, edit and pass back. The text is
    what the prompt file would need to give the same description (a caption cleaned as the
    released code cleans it; a prompt file's text is used as written)."""

    def __init__(self, stream):
        self.writer = csv.writer(stream, lineterminator="\n")
        self.stream = stream
        self.writer.writerow(["file", "prompt"])

    def write(self, source: Path, chosen) -> None:
        from ..engine.prompts import clean_caption

        text = chosen.text or ""
        if chosen.source == "blip":
            text = clean_caption(text)
        self.writer.writerow([str(source), text])
        self.stream.flush()
