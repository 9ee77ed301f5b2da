"""The captioner or classifier behind `--caption`, from the command's model resolution: found,
fetched or refused only when an image actually needs a description.

`ResolvedDescriber` stands where `PromptResolver` expects a `DescriberSpec`: its identity (the
cache key) comes from the store's install record, so a batch whose captions are all cached never
touches the weights, and a missing captioner is an error only when something must be captioned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..engine.settings import CaptionSettings
from ..errors import ModelError
from ..store import MissingModels, ModelRef, Origin, Resolution, fetch_command

if TYPE_CHECKING:
    from ..engine.captions import Describer, DescriberSpec


class ResolvedDescriber:
    def __init__(
        self,
        mode: str,
        models: Resolution,
        ref: ModelRef,
        settings: CaptionSettings,
        say: Callable[[str], None],
        runtime_label: str,
    ):
        self.kind, self.models, self.ref, self.settings = mode, models, ref, settings
        self.say, self.runtime_label = say, runtime_label

    def describer_spec(self, need_files: bool) -> DescriberSpec:
        """The spec for the engine. Without `need_files`, a store model's install record is enough
        (its commit names the weights); with it, the files are checked, and fetched or refused."""
        from ..engine.captions import DescriberSpec

        model = self.models[self.ref]
        if model.origin is Origin.PATH:
            if not model.path.is_dir():
                raise ModelError(f"{self.ref.role} {self.ref.spec}: no such folder")
            return DescriberSpec(self.kind, model.path, model.path.resolve().name, None, self.settings)
        if need_files or model.commit is None:
            model = self._require()
        assert model.repo_id is not None
        return DescriberSpec(self.kind, model.path, model.repo_id, model.commit, self.settings)

    def _require(self) -> Any:
        """The files, fetched when the policy allows it; else the two ways forward (exit 3)."""
        from ..prompts.sources import describer_missing

        model = self.models[self.ref]
        fetch = fetch_command([model.name or self.ref.spec], self.models.store.root)
        try:
            return self.models.require(self.ref)
        except MissingModels as exc:
            problems = "; ".join(p for found in exc.missing.values() for p in found)
            raise describer_missing(self.kind, self.ref.spec, f"{problems} in {exc.root} ({exc.why})", fetch) from None
        except ModelError as exc:  # the download failed: still the same two ways forward
            raise describer_missing(self.kind, self.ref.spec, str(exc), fetch) from None

    # -- what PromptResolver calls
    def identity(self) -> dict[str, Any]:
        return self.describer_spec(need_files=False).identity()

    def load(self, device: Any, dtype: Any) -> Describer:
        spec = self.describer_spec(need_files=True)
        import transformers  # its loading bars would drown our own stderr lines

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        what = "captioner" if self.kind == "blip" else "classifier"
        self.say(f"loading {what} {self.ref.spec} from {spec.folder} on {self.runtime_label}")
        return spec.load(device, dtype)
