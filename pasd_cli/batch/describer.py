"""The captioner or classifier behind `--caption`: a model from the store (or a folder), found,
fetched or refused only when an image actually needs a description.

`StoreDescriber` stands where `PromptResolver` expects a `DescriberSpec`: its identity (the cache
key) comes from the store's install record, so a batch whose captions are all cached never
touches the weights, and a missing captioner is an error only when something must be captioned.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import ModelError, UsageError
from .settings import CAPTION_MODEL, CLASSIFY_MODEL, CaptionSettings

# The store's kind for each --caption mode that uses a model.
MODEL_KINDS = {"blip": "captioner", "classify": "classifier"}
DEFAULT_MODELS = {"blip": CAPTION_MODEL, "classify": CLASSIFY_MODEL}


class StoreDescriber:
    """`spec` is a model name from `models/` (of the mode's kind) or a folder. Store models are
    fetched when `interactive` allows it (as `pasd upscale` fetches PASD), else refused with the
    two ways forward (exit 3)."""

    def __init__(
        self,
        mode: str,
        spec: str | None,
        settings: CaptionSettings,
        *,
        models_dir=None,
        offline: bool = False,
        interactive: bool = False,
        say: Callable[[str], None] = lambda text: None,
    ):
        from ..store.local import Store, names_a_path, offline_requested, store_root

        if mode not in MODEL_KINDS:
            raise ValueError(f"--caption {mode} uses no model")
        self.kind, self.settings, self.say = mode, settings, say
        self.offline, self.interactive = offline_requested(offline), interactive
        self.store = Store(store_root(models_dir))
        self.spec = spec or DEFAULT_MODELS[mode]
        self.folder: Path | None = None
        if names_a_path(self.spec, self.store.manifests):
            self.folder = Path(self.spec).expanduser()
        elif self.spec not in self.store.manifests:
            raise UsageError(
                f"--caption-model {self.spec}: unknown model name and no such folder",
                hint="known models: " + ", ".join(self._names_of_kind()),
            )
        elif self.store.manifest(self.spec).kind != MODEL_KINDS[mode]:
            raise UsageError(
                f"--caption-model {self.spec} is a {self.store.manifest(self.spec).kind}; "
                f"--caption {mode} needs a {MODEL_KINDS[mode]}",
                hint="known models: " + ", ".join(self._names_of_kind()),
            )

    def _names_of_kind(self) -> list[str]:
        return sorted(n for n, m in self.store.manifests.items() if m.kind == MODEL_KINDS[self.kind])

    def describer_spec(self, need_files: bool):
        """The spec for the engine. Without `need_files`, a store model's install record is enough
        (its commit names the weights); with it, the files are checked, and fetched or refused."""
        from ..engine.captions import DescriberSpec

        if self.folder is not None:
            if not self.folder.is_dir():
                raise ModelError(f"--caption-model {self.spec}: no such folder")
            return DescriberSpec(self.kind, self.folder, self.folder.resolve().name, None, self.settings)
        manifest = self.store.manifest(self.spec)
        record = None if need_files else self.store.read_record(self.spec)
        if record is None:
            self._ensure_files()
            record = self.store.read_record(self.spec)
        return DescriberSpec(
            self.kind, self.store.model_path(self.spec), manifest.repo_id, record.commit, self.settings
        )

    def _ensure_files(self) -> None:
        from ..prompts.sources import describer_missing
        from ..store.local import ensure_model, fetch_command, may_download, not_fetched_because

        fetch = fetch_command([self.spec], self.store.root)
        problems = self.store.problems(self.spec)
        if problems and not may_download(self.offline, self.interactive):
            why = not_fetched_because(self.offline)
            raise describer_missing(self.kind, self.spec, f"{'; '.join(problems)} in {self.store.root} ({why})", fetch)
        try:
            ensure_model(
                self.spec, models_dir=self.store.root, offline=self.offline, interactive=self.interactive, say=self.say
            )
        except ModelError as exc:  # the download failed: still the same two ways forward
            raise describer_missing(self.kind, self.spec, str(exc), fetch) from None

    # -- what PromptResolver calls
    def identity(self) -> dict:
        return self.describer_spec(need_files=False).identity()

    def load(self, device, dtype):
        from ..cli.runtime import dtype_name

        spec = self.describer_spec(need_files=True)
        import transformers  # its loading bars would drown our own stderr lines

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        what = "captioner" if self.kind == "blip" else "classifier"
        self.say(f"loading {what} {self.spec} from {spec.folder} on {device} ({dtype_name(dtype)})")
        return spec.load(device, dtype)
