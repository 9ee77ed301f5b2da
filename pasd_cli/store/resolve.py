"""The one resolver: every model a command uses, as its command line names it (a model name from
`models/`, a file or folder, or a hub repo id), becomes a local path here, with one policy for
downloading and one error that names everything missing together with the command that fetches it.

A command lists its references (`ModelRef`: the spec, the kind of model it must be, and the role
that names it in messages) and calls `resolve` once. A lazy reference (the captioner, needed only
if some image must be captioned) is located but neither fetched nor refused; `Resolution.require`
does that later, under the same policy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from ..errors import ModelError
from .hub_bases import hub_store, is_repo_id, store_name
from .local import Store, fetch_command, may_download, not_fetched_because, offline_requested, store_root
from .manifests import Manifest

Say = Callable[[str], None]


class Kind(str, Enum):
    """What a reference must be."""

    PASD = "pasd"  # a PASD checkpoint (unet/ and controlnet/)
    BASE = "base"  # Stable Diffusion 1.5 in diffusers layout
    STYLE = "style"  # a personalized SD 1.5 base: a checkpoint file, a folder, or a hub repo
    LORA = "lora"  # a LoRA weights file
    CAPTIONER = "captioner"  # BLIP, for captions
    CLASSIFIER = "classifier"  # an ImageNet classifier, for class labels


# The manifest kind (models/*.json) a model name must have for each kind of reference.
_MANIFEST_KIND = {
    Kind.PASD: "pasd",
    Kind.BASE: "base",
    Kind.STYLE: "base",
    Kind.LORA: "lora",
    Kind.CAPTIONER: "captioner",
    Kind.CLASSIFIER: "classifier",
}
_WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


class Origin(str, Enum):
    PATH = "path"  # a file or folder named by the user
    STORE = "store"  # a model with a manifest, in the store
    HUB = "hub"  # a base named by hub repo id, in the store


@dataclass(frozen=True)
class ModelRef:
    spec: str  # a model name, a path, or (for a style) a hub repo id
    kind: Kind
    role: str  # how the caller names it in messages, e.g. the option that gave it
    lazy: bool = False  # located now, fetched or refused only by `Resolution.require`


@dataclass(frozen=True)
class ResolvedModel:
    ref: ModelRef
    origin: Origin
    path: Path  # what the engine is given: a folder, or the weights file of a LoRA
    name: str | None = None  # its folder's name in the store (store and hub origins)
    repo_id: str | None = None
    commit: str | None = None  # from the install record, when there is one
    problems: tuple[str, ...] = ()  # why a lazy reference cannot be used yet

    @property
    def usable(self) -> bool:
        return not self.problems


class MissingModels(ModelError):
    """Models not (or not fully) in the store that the policy does not allow to fetch: one error
    for all of them, with the one command that fetches them."""

    def __init__(self, root: Path, missing: Mapping[str, Sequence[str]], why: str):
        self.root, self.missing, self.why = Path(root), dict(missing), why
        models = [f"'{name}' ({_problem_text(p)})" for name, p in missing.items() if not is_repo_id(name)]
        bases = [
            f"base {name}" + ("" if list(p) == ["not installed"] else f" ({_problem_text(p)})")
            for name, p in missing.items()
            if is_repo_id(name)
        ]
        parts = [f"{'model' if len(models) == 1 else 'models'} {', '.join(models)}"] if models else []
        parts += bases
        where = "not usable in" if models else "not in"
        super().__init__(
            f"{' and '.join(parts)} {where} {self.root} ({why})",
            hint=f"fetch with: {self.fetch}",
        )

    @property
    def fetch(self) -> str:
        return fetch_command(self.missing, self.root)


def _problem_text(problems: Sequence[str]) -> str:
    return problems[0] if list(problems) == ["not installed"] else "; ".join(problems)


def looks_like_path(spec: str) -> bool:
    return "/" in spec or "\\" in spec or spec.startswith((".", "~")) or spec.lower().endswith(_WEIGHT_SUFFIXES)


def names_a_path(spec: str, manifests: Mapping[str, Manifest]) -> bool:
    """Whether a NAME|PATH spec means a path: it looks like one, or it is a bare word that names
    no model but an existing file or folder (a model name wins: write ./pasd for a folder of
    that name)."""
    return looks_like_path(spec) or (spec not in manifests and Path(spec).expanduser().exists())


@dataclass(frozen=True)
class Located:
    """Where a reference points, before anything is fetched: no file is read but a path's
    existence."""

    ref: ModelRef
    origin: Origin
    path: Path | None = None  # PATH origin
    name: str | None = None  # the model name (STORE) or the hub repo id (HUB)


def locate(ref: ModelRef, manifests: Mapping[str, Manifest]) -> Located:
    """Which of a path, a store model or a hub repo `ref` names; ModelError for a spec that
    names nothing, or a model of the wrong kind."""
    spec, role = ref.spec, ref.role
    if not spec:
        raise ModelError(f"no model given for {role}", hint=f"pass {role} NAME or {role} PATH")
    path = Path(spec).expanduser()
    if ref.kind is Kind.STYLE:
        if path.exists():
            return Located(ref, Origin.PATH, path=path)
        if spec in manifests:
            _check_kind(ref, manifests[spec])
            if not {"unet/config.json", "config.json"} & set(manifests[spec].files):
                raise ModelError(f"{role} {spec}: '{spec}' has no UNet (it is plain SD 1.5); name a personalized base")
            return Located(ref, Origin.STORE, name=spec)
        if is_repo_id(spec):
            return Located(ref, Origin.HUB, name=spec)
        raise ModelError(f"{role} {spec}: no such file or folder, model name, or hub repo id (owner/name)")
    if ref.kind is Kind.LORA:
        if not path.exists() and spec in manifests:
            _check_kind(ref, manifests[spec])
            return Located(ref, Origin.STORE, name=spec)
        return Located(ref, Origin.PATH, path=path)  # a missing file: the LoRA checks name it
    if not names_a_path(spec, manifests):
        if spec not in manifests:
            raise ModelError(
                f"{role} {spec}: unknown model name and no such folder",
                hint="known models: " + ", ".join(_names_of(ref.kind, manifests)),
            )
        _check_kind(ref, manifests[spec])
        return Located(ref, Origin.STORE, name=spec)
    if not path.exists() and not ref.lazy:
        raise ModelError(f"{role} {spec}: no such file or folder")
    return Located(ref, Origin.PATH, path=path)


def _names_of(kind: Kind, manifests: Mapping[str, Manifest]) -> list[str]:
    return sorted(name for name, m in manifests.items() if m.kind == _MANIFEST_KIND[kind])


def _check_kind(ref: ModelRef, manifest: Manifest) -> None:
    wanted = _MANIFEST_KIND[ref.kind]
    if manifest.kind == wanted:
        return
    what = {"lora": "a LoRA", "base": "a base"}.get(wanted, f"a {wanted} model")
    hint, field_ = None, None
    if manifest.kind == "lora":
        hint, field_ = "pass it as a LoRA", "loras"
    raise ModelError(
        f"{ref.role} {ref.spec}: '{ref.spec}' is a {manifest.kind} model, not {what}", hint=hint, field=field_
    )


def _lora_file(folder: Path, manifest: Manifest) -> Path:
    """The weights file of a LoRA model in the store."""
    weights = [f for f in manifest.files if f.lower().endswith(".safetensors")]
    if len(weights) != 1 or manifest.entry:
        raise ModelError(f"bad model manifest {manifest.name}: a LoRA lists exactly one .safetensors file and no entry")
    return folder / weights[0]


@dataclass
class Resolution:
    """Every reference of one command, resolved; `require` for the lazy ones."""

    store: Store
    offline: bool
    interactive: bool
    say: Say
    endpoint: str | None = None
    models: dict[ModelRef, ResolvedModel] = field(default_factory=dict)
    _located: dict[ModelRef, Located] = field(default_factory=dict)

    def __getitem__(self, ref: ModelRef) -> ResolvedModel:
        return self.models[ref]

    def path(self, ref: ModelRef) -> Path:
        return self.models[ref].path

    def require(self, ref: ModelRef) -> ResolvedModel:
        """A lazy reference made usable: fetched when the policy allows it, else MissingModels
        (a missing path: ModelError)."""
        model = self.models[ref]
        if model.usable:
            return model
        located = self._located[ref]
        if located.origin is Origin.PATH:
            raise ModelError(f"{ref.role} {ref.spec}: no such file or folder")
        self._fetch_or_refuse([located], {self._key(located): list(model.problems)})
        self.models[ref] = self._describe(located)
        return self.models[ref]

    # -- internals
    @staticmethod
    def _key(located: Located) -> str:
        assert located.name is not None
        return located.name

    def _problems(self, located: Located) -> list[str]:
        if located.origin is Origin.PATH:
            assert located.path is not None
            return [] if located.path.exists() else ["no such file or folder"]
        if located.origin is Origin.HUB:
            assert located.name is not None
            hub = hub_store(self.store.root, located.name)
            return ["not installed"] if hub is None else hub.problems(store_name(located.name))
        return self.store.problems(self._key(located))

    def _fetch_or_refuse(
        self, located: list[Located], missing: dict[str, list[str]], also: dict[str, list[str]] | None = None
    ) -> None:
        """Fetch `located` (whose problems are `missing`), or refuse them all in one error that
        also names `also`: lazy models missing too, so that one command fetches everything."""
        if not may_download(self.offline, self.interactive):
            raise MissingModels(self.store.root, {**missing, **(also or {})}, not_fetched_because(self.offline))
        from .hub import download
        from .hub_bases import download_hub_base

        for item in located:
            if item.origin is Origin.HUB:
                download_hub_base(
                    self.store.root, self._key(item), say=self.say, show_bar=self.interactive, endpoint=self.endpoint
                )
            else:
                download(self.store, self._key(item), endpoint=self.endpoint, say=self.say, show_bar=self.interactive)

    def _describe(self, located: Located) -> ResolvedModel:
        ref = located.ref
        problems = tuple(self._problems(located))
        if located.origin is Origin.PATH:
            assert located.path is not None
            return ResolvedModel(ref, Origin.PATH, located.path, problems=problems)
        name = self._key(located)
        if located.origin is Origin.HUB:
            folder = store_name(name)
            hub = hub_store(self.store.root, name) or Store(self.store.root, manifests={})
            record = hub.read_record(folder)
            return ResolvedModel(
                ref,
                Origin.HUB,
                self.store.model_dir(folder),
                name=folder,
                repo_id=name,
                commit=record.commit if record else None,
                problems=problems,
            )
        manifest = self.store.manifest(name)
        record = self.store.read_record(name)
        path = self.store.model_path(name)
        if ref.kind is Kind.LORA:
            path = _lora_file(path, manifest)
        return ResolvedModel(
            ref,
            Origin.STORE,
            path,
            name=name,
            repo_id=manifest.repo_id,
            commit=record.commit if record else None,
            problems=problems,
        )


def resolve(
    refs: Iterable[ModelRef],
    *,
    models_dir: str | Path | None = None,
    offline: bool = False,
    interactive: bool = False,
    say: Say | None = None,
    endpoint: str | None = None,
    manifests: Mapping[str, Manifest] | None = None,
) -> Resolution:
    """Every reference as a local path. Missing store models and hub bases are fetched only when a
    person at a terminal did not ask for offline (`may_download`); otherwise one MissingModels
    error names all of them. Lazy references are located and described, never fetched here."""
    store = Store(store_root(models_dir), manifests)
    resolution = Resolution(store, offline_requested(offline), interactive, say or (lambda text: None), endpoint)
    located = []
    for ref in dict.fromkeys(refs):  # each reference once, in order
        item = locate(ref, store.manifests)
        located.append(item)
        resolution._located[ref] = item
    missing: dict[str, list[str]] = {}
    to_fetch: list[Located] = []
    for item in located:
        if item.ref.lazy or item.origin is Origin.PATH:
            continue
        problems = resolution._problems(item)
        if problems and resolution._key(item) not in missing:
            missing[resolution._key(item)] = problems
            to_fetch.append(item)
    if missing:
        lazy_missing = {}
        for item in located:
            if item.ref.lazy and item.origin is not Origin.PATH and resolution._key(item) not in missing:
                problems = resolution._problems(item)
                if problems:
                    lazy_missing[resolution._key(item)] = problems
        resolution._fetch_or_refuse(to_fetch, missing, also=lazy_missing)
    for item in located:
        resolution.models[item.ref] = resolution._describe(item)
    return resolution


__all__ = [
    "Kind",
    "Located",
    "MissingModels",
    "ModelRef",
    "Origin",
    "Resolution",
    "ResolvedModel",
    "locate",
    "looks_like_path",
    "names_a_path",
    "resolve",
]
