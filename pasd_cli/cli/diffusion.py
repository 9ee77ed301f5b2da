"""What `upscale`, `stylize` and `colorize` share as command objects for the batch runner: the
models they resolve (once), the prompt pre-pass, where the model runs, the per-image call into
the engine and the record every output carries. Each command adds how its pipeline loads."""

from __future__ import annotations

import functools
import os
from abc import abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from ..batch.command import ImageCommand, Pending, Progress
from ..batch.plan import Job, Size
from ..batch.prompt_pass import ImagePrompts, PromptChoice
from ..batch.records import JobResult
from ..batch.report import Reporter
from ..batch.settings import BatchSettings
from ..engine.settings import CAPTION_SEPARATOR, FAST_GUIDANCE, FAST_MAX_STEPS, FAST_STEPS, UpscaleSettings
from ..errors import DeviceError, UsageError
from ..store import (
    Kind,
    ModelRef,
    Resolution,
    converted_dir,
    offline_requested,
    resolve,
    runs_at_terminal,
    store_root,
)
from .options import ModelChoice
from .runtime import EXACT_DTYPE_OPTION, PeakMemory, Runtime, dtype_name, pick_runtime

if TYPE_CHECKING:
    from PIL import Image

    from ..engine.pipeline import PASDPipeline, UpscaleResult


# Settings documented to give the same image (within float rounding): not in the fingerprint.
SAME_PIXELS = ("tile_batch", "vae_tile")


S = TypeVar("S", bound=UpscaleSettings)


def fast_settings(settings: S, given: Callable[[str], bool]) -> S:
    """--fast's steps and guidance, where the user did not choose them (`given(option name)`)."""
    if given("steps") and settings.steps > FAST_MAX_STEPS:  # the scheduler would refuse it image by image
        raise UsageError(f"--steps {settings.steps}: --fast's LCM schedule takes at most {FAST_MAX_STEPS} steps")
    return replace(
        settings,
        steps=settings.steps if given("steps") else FAST_STEPS,
        guidance=settings.guidance if given("guidance") else FAST_GUIDANCE,
    )


def given_on_command_line(ctx: Any) -> Callable[[str], bool]:
    """Whether an option was given on the command line (`ctx`: the command's typer.Context)."""

    def given(name: str) -> bool:
        source = ctx.get_parameter_source(name)
        return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")

    return given


def number_field(value: float) -> str:
    """4.0 -> "4", 2.5 -> "2.5": how a number reads in a file name."""
    return f"{value:g}"


class DiffusionCommand(ImageCommand):
    """A PASD command: resolve its models, describe its images, load its pipeline, run each image
    through it. Subclasses name themselves and load their pipeline (`load_pipeline`)."""

    name: ClassVar[str]

    def __init__(self, settings: UpscaleSettings, models: ModelChoice, prompts: PromptChoice, batch: BatchSettings):
        super().__init__(batch)
        self.settings, self.models = settings, exact_precision(settings, models)
        self.prompts = ImagePrompts(prompts, settings, batch.dry_run, batch.json, rule=self.prompt_rule)
        self.pasd_ref = ModelRef(models.pasd, Kind.PASD, "--pasd")
        self.base_ref = ModelRef(models.base, Kind.BASE, "--base")
        self.resolution: Resolution | None = None
        self._runtime: Runtime | None = None
        self.pipeline: PASDPipeline | None = None
        self._identity: dict[str, Any] = {}
        self._reporter: Reporter | None = None
        self._models_fingerprint: list[list[Any]] | None = None  # of the models as installed now
        self._identify: Callable[[ModelRef], dict[str, Any]] = lambda ref: {"spec": ref.spec}

    @staticmethod
    def prompt_rule(
        user_prompt: str,
        added_prompt: str,
        caption: str | None = None,
        label: str | None = None,
        separator: str = CAPTION_SEPARATOR,
    ) -> str:
        """The positive prompt the engine builds from the settings and an image's description."""
        from ..engine.prompts import build_prompt

        return build_prompt(user_prompt, added_prompt, caption=caption, label=label, separator=separator)

    # -- what the runner asks before running
    @property
    def seed(self) -> int:
        return self.settings.seed

    def name_fields(self) -> dict[str, str]:
        s = self.settings
        return {"scale": number_field(s.scale), "seed": str(s.seed), "steps": str(s.steps)}

    def fingerprint(self, job: Job) -> dict[str, Any]:
        """What decides the output's pixels: the settings (less those documented to give the same
        result), the models as they are installed now, the dtype asked for, the JPEG/WebP
        quality, and where the image's description comes from."""
        if self._models_fingerprint is None:
            from ..store import load_manifests, model_identity

            root, manifests = store_root(self.models.models_dir), load_manifests()
            self._identify = functools.partial(model_identity, root=root, manifests=manifests)
            self._models_fingerprint = [[ref.role, self._identify(ref)] for ref in self.model_refs()]
        settings = {k: v for k, v in asdict(self.settings).items() if k not in SAME_PIXELS}
        return {
            "command": self.name,
            "settings": settings,
            "models": self._models_fingerprint,
            "dtype": self.models.dtype,
            "quality": self.batch.quality,
            "prompt": self.prompts.fingerprint(job, self._identify),
            **self.fingerprint_extra(),
        }

    def fingerprint_extra(self) -> dict[str, Any]:
        """What else decides a subclass's pixels."""
        return {}

    def planned_size(self, size: Size) -> Size:
        from ..engine.resize import output_size  # no torch: sizes from headers alone

        return output_size(size, self.settings.scale)

    def planned_working_size(self, size: Size) -> Size:
        from ..engine.resize import working_size

        return working_size(size, self.settings.scale, self.settings.process_size)

    # -- the lifecycle
    def model_refs(self) -> list[ModelRef]:
        """Every model the pipeline loads."""
        return [self.pasd_ref, self.base_ref]

    def resolve(self, reporter: Reporter, dry_run: bool) -> None:
        if offline_requested(self.models.offline):
            os.environ["HF_HUB_OFFLINE"] = "1"  # for every library loaded below, not just our store
        refs = [] if dry_run else self.model_refs()
        self.resolution = resolve(
            [*refs, *self.prompts.refs()],
            models_dir=self.models.models_dir,
            offline=self.models.offline,
            interactive=runs_at_terminal(),
            say=reporter.info,
        )

    def prepass(self, pending: Pending) -> None:
        assert self.resolution is not None  # resolved first, by the runner
        self.prompts.prepass(pending, self.resolution, self.runtime, store_root(self.models.models_dir))

    def runtime(self) -> Runtime:
        """The device and dtype (--device, --dtype), chosen once."""
        if self._runtime is None:
            runtime = pick_runtime(
                self.models.device,
                self.models.dtype,
                self.models.local_rank,
                exact=self.models.exact,
                compile=self.models.compile,
            )
            from ..nn.converted_weights import ConvertedWeights

            # Written in the background: the first run does not wait for 3 GB to be written.
            copies = ConvertedWeights(converted_dir(self.models.models_dir), background=True)
            self._runtime = replace(runtime, converted=copies)
        return self._runtime

    def meeting_device(self) -> Any:
        if self.batch.dry_run:
            return None
        device = self.runtime().device
        return device if device.type == "cuda" else None

    def load(self, reporter: Reporter) -> None:
        from .faults import reach
        from .runtime import heap_reused_while_computing, memory_budget

        reach("load")
        assert self.resolution is not None
        runtime = self.runtime()
        quiet_libraries()
        pasd_dir = self.resolution.path(self.pasd_ref)
        reporter.info(f"loading PASD from {pasd_dir} on {runtime.label}")
        pipeline, identity = self.load_pipeline(self.resolution, runtime, reporter)
        if pipeline.half_weights:
            reporter.debug("weights stored in 16 bits are kept so and widened to float32 as each layer runs")
        # NHWC on CUDA, where cuDNN's half-precision convolutions want it; elsewhere the
        # networks keep their own layout (not measured faster there).
        pipeline.optimize(channels_last=runtime.device.type == "cuda", compile=self.models.compile)
        if self.models.compile:
            identity = {**identity, "compiled": True}
        mb = self.models.vae_memory_mb  # measured with the models in place
        pipeline.memory_budget = mb * 2**20 if mb else memory_budget(runtime.device)
        if runtime.device.type == "cpu":
            pipeline.compute_scope = heap_reused_while_computing
        self.pipeline, self._reporter = pipeline, reporter
        self._models_fingerprint = None  # what the outputs record: the models as loaded (maybe just fetched)
        self._identity = {
            "pasd": str(pasd_dir),
            "base": str(self.resolution.path(self.base_ref)),
            "variant": pipeline.unet.paca_variant,
            "rrdb_blocks": pipeline.controlnet.rrdb_blocks,
            "device": str(runtime.device),
            "dtype": runtime.dtype_name,
            "vae_dtype": dtype_name(pipeline.vae.vae.dtype),
            "half_weights": pipeline.half_weights,
            **identity,
        }

    def close(self, reporter: Reporter) -> None:
        copies = self.runtime().converted
        if copies is None:
            return
        copies.wait()
        if copies.written:
            size = sum(_size(path) for path in copies.written) / 1e9
            reporter.info(
                f"kept the weights converted to {self.runtime().dtype_name} in {copies.folder} ({size:.1f} GB), "
                "so that later runs load them without converting; deleting that folder frees the space"
            )

    @abstractmethod
    def load_pipeline(
        self, models: Resolution, runtime: Runtime, reporter: Reporter
    ) -> tuple[PASDPipeline, dict[str, Any]]:
        """The command's pipeline on `runtime`, and what the outputs record about its models
        beyond PASD and SD 1.5."""

    def work(self, job: Job, progress: Progress) -> JobResult:
        from .faults import watch

        return super().work(job, watch(progress))

    def transform(self, rgb: Image.Image, job: Job, progress: Progress) -> tuple[Image.Image, dict[str, Any]]:
        assert self.pipeline is not None  # loaded by the runner before the first job
        chosen = self.prompts.for_job(job)
        warn = self._reporter.warn if self._reporter is not None else None
        memory = PeakMemory(self.runtime().device)
        memory.start()
        result = upscale_image(self.pipeline, rgb, self.settings, job, progress, warn, chosen.pipeline_args())
        # The JSON record also gets `chosen.to_json()`, from the pre-pass.
        tiles: dict[str, Any] = {
            "latent_tiles": result.latent_tiles,
            "tile_batch": result.tile_batch,
            "vae_tile": result.vae_tile,
        }
        tiles.update(self.attention_window(result.vae_attention_window))
        if result.dtype is not None and result.dtype != self.runtime().dtype:  # after an overflow
            tiles["dtype"] = dtype_name(result.dtype)
        # The JSON record only: the output's metadata must not change from run to run.
        job.extra.update(peak_memory_mb=round(memory.peak() / 2**20, 1), peak_memory_kind=memory.kind)
        return result.image, {"prompt": result.prompt, **chosen.provenance(), **tiles}

    told_window = False

    def attention_window(self, window: int) -> dict[str, int]:
        """The record's field for an approximated VAE attention; the first time the engine chose
        one by itself, a warning (once per run: every large image gets it)."""
        if not window:
            return {}
        if self.settings.vae_attention_window is None and not self.told_window and self._reporter is not None:
            self._reporter.warn(
                f"the VAE's attention is approximated within {window} latent pixels on large images on the "
                "CPU, where exact global attention would cost more than the rest of the VAE "
                "(--vae-attention-window 0 keeps it exact)"
            )
            self.told_window = True
        return {"vae_attention_window": window}

    def record(self) -> dict[str, Any]:
        return {"command": self.name, "settings": asdict(self.settings), "model": self._identity}


def exact_precision(settings: UpscaleSettings, models: ModelChoice) -> ModelChoice:
    """--exact computes in fp32 (what --dtype auto then means); another --dtype contradicts it."""
    if not settings.exact:
        return models
    if models.dtype not in ("auto", EXACT_DTYPE_OPTION):
        raise UsageError(
            f"--exact computes in {EXACT_DTYPE_OPTION}, not --dtype {models.dtype}",
            hint="drop --dtype for the released computation, or drop --exact",
        )
    return replace(models, dtype=EXACT_DTYPE_OPTION, exact=True)


def upscale_image(
    pipeline: PASDPipeline,
    rgb: Image.Image,
    settings: UpscaleSettings,
    job: Job,
    progress: Progress | None = None,
    warn: Callable[[str], None] | None = None,
    prompt: dict[str, str | None] | None = None,
) -> UpscaleResult:
    """One image through the engine; running out of memory fails the batch (exit 4) with the
    image named. `prompt`: the image's high-level information (`ImagePrompt.pipeline_args`)."""
    from ..engine import upscale

    with out_of_memory_fails_batch(pipeline, job, "upscaling"):
        return upscale(pipeline, rgb, settings, progress=progress, on_warning=warn, **(prompt or {}))


@contextmanager
def out_of_memory_fails_batch(pipeline: PASDPipeline, job: Job, doing: str) -> Iterator[None]:
    """Running out of memory on an image (after the engine's own retries) is a DeviceError that
    names the image: the next images would run out too."""
    from ..engine.memory import is_out_of_memory

    try:
        yield
    except RuntimeError as exc:  # torch.OutOfMemoryError is one
        if not is_out_of_memory(exc):
            raise
        raise DeviceError(
            f"out of memory on {pipeline.device} {doing} {job.source}",
            hint="use a smaller --latent-tile or --process-size",
        ) from None


def quiet_libraries() -> None:
    """Library logs and progress bars would drown our own stderr lines."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def run(command: DiffusionCommand, batch: BatchSettings) -> None:
    """Run the command over the batch; exit code 1 when some input failed."""
    import typer

    from ..batch.runner import run_batch

    summary = run_batch(command, batch)
    if summary.exit_code:
        raise typer.Exit(summary.exit_code)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
