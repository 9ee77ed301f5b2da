"""The model store: manifests, where models live, what is installed, and resolving `--pasd` /
`--base` to a local folder.

Layout of the store (`--models-dir`, else `PASD_HOME`, else the user's cache folder):

    <root>/<name>/<subfolder>/<files...>    the files, in the hub repo's layout
    <root>/<name>/pasd-model.json           the install record, written atomically, last
    <root>/<name>/.cache/huggingface/       huggingface_hub's local_dir bookkeeping

A model is installed only when its record exists and every recorded file has the recorded size
(and, when its modification time changed since the record was written, the recorded sha256).
The record is written after every file was checked against the hub's size and hash, so a file
that was cut short or corrupted is never used. Downloading lives in `hub.py`, bundles in
`bundle.py`; this module never touches the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import write_atomic
from ..batch import settings
from ..errors import ModelError

RECORD_NAME = "pasd-model.json"
RECORD_FORMAT = 1
KINDS = ("pasd", "base", "captioner", "classifier", "lora")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_TRUE = {"1", "true", "yes", "on"}


# ---------------------------------------------------------------------------------------------
# Manifests (data files in models/, shipped in the wheel as pasd_cli/models)


@dataclass(frozen=True)
class Manifest:
    name: str
    kind: str
    description: str
    repo_id: str
    revision: str
    subfolder: str
    files: tuple[str, ...]
    license: str
    needs: tuple[str, ...] = ()
    entry: str = ""
    repo_type: str = "model"
    variant: Mapping | None = None
    note: str = ""

    @property
    def repo_paths(self) -> list[str]:
        """The files' paths inside the hub repo (and inside the model's store folder)."""
        return [f"{self.subfolder}/{f}" if self.subfolder else f for f in self.files]

    @property
    def entry_path(self) -> str:
        """The folder, relative to the model's store folder, that the engine is given."""
        return "/".join(p for p in (self.subfolder, self.entry) if p)


def manifests_dir() -> Path:
    """In a wheel the manifests sit in pasd_cli/models; in a source checkout, in models/ beside
    the package (an editable install cannot import a data-only folder as a package)."""
    packaged = Path(__file__).parent.parent / "models"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent.parent / "models"


def _parse_manifest(path: Path) -> Manifest:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        manifest = Manifest(
            name=data["name"],
            kind=data["kind"],
            description=data.get("description", ""),
            repo_id=data["repo_id"],
            revision=data.get("revision", "main"),
            subfolder=data.get("subfolder", "").strip("/"),
            files=tuple(data["files"]),
            license=data["license"],
            needs=tuple(data.get("needs", ())),
            entry=data.get("entry", "").strip("/"),
            repo_type=data.get("repo_type", "model"),
            variant=data.get("variant"),
            note=data.get("note", ""),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"bad model manifest {path}: {exc}") from None
    if manifest.name != path.stem or not _NAME.match(manifest.name):
        raise ModelError(f"bad model manifest {path}: name {manifest.name!r} must equal the file name")
    if manifest.kind not in KINDS:
        raise ModelError(f"bad model manifest {path}: kind {manifest.kind!r} is not one of {', '.join(KINDS)}")
    if not manifest.files or any(f.startswith("/") or ".." in f.split("/") for f in manifest.files):
        raise ModelError(f"bad model manifest {path}: files must be relative paths inside the subfolder")
    return manifest


def load_manifests(folder: Path | None = None) -> dict[str, Manifest]:
    manifests = [_parse_manifest(p) for p in sorted((folder or manifests_dir()).glob("*.json"))]
    return {m.name: m for m in manifests}


def get_manifest(name: str, manifests: Mapping[str, Manifest] | None = None) -> Manifest:
    manifests = load_manifests() if manifests is None else manifests
    if name not in manifests:
        raise ModelError(f"unknown model '{name}'", hint=f"known models: {', '.join(sorted(manifests))}")
    return manifests[name]


def with_needs(names: Iterable[str], manifests: Mapping[str, Manifest] | None = None) -> list[str]:
    """`names` and everything they need, each once, needs after the models that need them."""
    manifests = load_manifests() if manifests is None else manifests
    ordered: list[str] = []
    pending = list(names)
    while pending:
        name = pending.pop(0)
        if name not in ordered:
            ordered.append(name)
            pending.extend(get_manifest(name, manifests).needs)
    return ordered


def default_models() -> list[str]:
    """What `pasd upscale` uses when no model is named: PASD, its base, and the captioner."""
    return with_needs([settings.PASD_MODEL, settings.BASE_MODEL, settings.CAPTION_MODEL])


# ---------------------------------------------------------------------------------------------
# Where the store is, and whether we may go online


def user_cache_dir(env: Mapping[str, str] | None = None, platform: str | None = None) -> Path:
    """The platform's per-user cache folder for pasd."""
    env = os.environ if env is None else env
    platform = sys.platform if platform is None else platform
    home = Path(env.get("HOME") or Path.home())
    if platform.startswith("win"):
        base = env.get("LOCALAPPDATA") or str(home / "AppData" / "Local")
        return Path(base) / "pasd" / "Cache"
    if platform == "darwin":
        return home / "Library" / "Caches" / "pasd"
    return Path(env.get("XDG_CACHE_HOME") or home / ".cache") / "pasd"


def store_root(models_dir: str | Path | None = None, env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if models_dir:
        return Path(models_dir).expanduser()
    if env.get("PASD_HOME"):
        return Path(env["PASD_HOME"]).expanduser()
    return user_cache_dir(env)


def offline_requested(flag: bool = False, env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return flag or any(env.get(v, "").strip().lower() in _TRUE for v in ("PASD_OFFLINE", "HF_HUB_OFFLINE"))


def runs_at_terminal(stdin=None, stderr=None) -> bool:
    """A person is watching: both stdin and stderr are terminals (cron, pipes and services are not)."""
    stdin = sys.stdin if stdin is None else stdin
    stderr = sys.stderr if stderr is None else stderr
    return bool(stdin and stdin.isatty() and stderr and stderr.isatty())


def may_download(offline: bool, interactive: bool) -> bool:
    """A missing model is fetched on the fly only for a person at a terminal who did not ask for
    offline: a cron job must never download by surprise."""
    return interactive and not offline


def not_fetched_because(offline: bool) -> str:
    """Why a missing model was not fetched (`may_download` said no)."""
    return "offline" if offline else "no terminal, so no automatic download"


def fetch_command(names: Iterable[str], root: Path) -> str:
    """The command that fetches (or repairs) `names` in the store at `root`, ready to paste."""
    command = "pasd download " + " ".join(names)
    return command + (f" --models-dir {shlex.quote(str(root))}" if Path(root) != store_root() else "")


# ---------------------------------------------------------------------------------------------
# Install records and checks


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))


@dataclass
class Record:
    """What was installed: per file (path inside the model folder) its size and sha256."""

    name: str
    repo_id: str
    revision: str
    commit: str
    subfolder: str
    entry: str
    files: dict[str, dict] = field(default_factory=dict)
    source: str = ""

    @property
    def size(self) -> int:
        return sum(f["size"] for f in self.files.values())

    def to_json(self) -> dict:
        return {
            "format": RECORD_FORMAT,
            "name": self.name,
            "repo_id": self.repo_id,
            "revision": self.revision,
            "commit": self.commit,
            "subfolder": self.subfolder,
            "entry": self.entry,
            "source": self.source,
            "files": self.files,
        }

    @classmethod
    def from_json(cls, data: dict) -> Record:
        if data.get("format") != RECORD_FORMAT:
            raise ValueError(f"unknown record format {data.get('format')!r}")
        files = data["files"]
        if not isinstance(files, dict) or not all(
            isinstance(f, dict) and isinstance(f.get("size"), int) and isinstance(f.get("sha256"), str)
            for f in files.values()
        ):
            raise ValueError("bad file list")
        return cls(
            name=data["name"],
            repo_id=data["repo_id"],
            revision=data["revision"],
            commit=data["commit"],
            subfolder=data.get("subfolder", ""),
            entry=data.get("entry", ""),
            files=files,
            source=data.get("source", ""),
        )


def safe_relative(path: str) -> bool:
    parts = path.split("/")
    return bool(path) and not path.startswith("/") and "\\" not in path and all(p not in ("", ".", "..") for p in parts)


class Store:
    """The models under one root folder."""

    def __init__(self, root: Path, manifests: Mapping[str, Manifest] | None = None):
        self.root = Path(root)
        self.manifests = load_manifests() if manifests is None else dict(manifests)

    def manifest(self, name: str) -> Manifest:
        return get_manifest(name, self.manifests)

    def model_dir(self, name: str) -> Path:
        return self.root / name

    def model_path(self, name: str) -> Path:
        """The folder handed to the engine."""
        return self.model_dir(name) / self.manifest(name).entry_path

    def record_path(self, name: str) -> Path:
        return self.model_dir(name) / RECORD_NAME

    def read_record(self, name: str) -> Record | None:
        path = self.record_path(name)
        try:
            record = Record.from_json(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return None  # an unreadable record means "not installed"; download rewrites it
        if not all(safe_relative(p) for p in record.files):
            return None
        return record

    def write_record(self, record: Record) -> None:
        for rel, info in record.files.items():
            info["mtime_ns"] = (self.model_dir(record.name) / rel).stat().st_mtime_ns
        write_json_atomic(self.record_path(record.name), record.to_json())

    def forget(self, name: str) -> None:
        """Mark the model not installed before any of its files change."""
        self.record_path(name).unlink(missing_ok=True)

    def problems(self, name: str, full: bool = False, hash_fn: Callable[[Path], str] = sha256_file) -> list[str]:
        """Why the model cannot be used, empty when it can. `full` re-hashes every file; otherwise
        only files whose modification time changed since the record was written are hashed."""
        record = self.read_record(name)
        if record is None:
            return ["not installed"]
        wanted = set(self.manifest(name).repo_paths)
        missing_from_record = sorted(wanted - set(record.files))
        if missing_from_record:
            return [f"not installed ({', '.join(missing_from_record)} not recorded)"]
        found = []
        for rel, info in sorted(record.files.items()):
            path = self.model_dir(name) / rel
            try:
                stat = path.stat()
            except OSError:
                found.append(f"{rel}: missing")
                continue
            if stat.st_size != info["size"]:
                found.append(f"{rel}: size {stat.st_size}, expected {info['size']}")
            elif (full or stat.st_mtime_ns != info.get("mtime_ns")) and hash_fn(path) != info["sha256"]:
                found.append(f"{rel}: sha256 mismatch")
        return found

    def installed(self, name: str) -> bool:
        return not self.problems(name)


# ---------------------------------------------------------------------------------------------
# Resolving a NAME or a path


def looks_like_path(spec: str) -> bool:
    return (
        "/" in spec
        or "\\" in spec
        or spec.startswith((".", "~"))
        or spec.endswith((".safetensors", ".ckpt", ".pt", ".bin"))
    )


def names_a_path(spec: str, manifests: Mapping[str, Manifest]) -> bool:
    """Whether a NAME|PATH option means a path: it looks like one, or it is a bare word that
    names no model but an existing file or folder (a model name wins: write ./pasd for a folder
    of that name)."""
    return looks_like_path(spec) or (spec not in manifests and Path(spec).expanduser().exists())


def _missing_message(store: Store, missing: dict[str, list[str]], offline: bool) -> ModelError:
    parts = []
    for name, problems in missing.items():
        parts.append(
            f"'{name}' ({problems[0]})" if problems[0] == "not installed" else f"'{name}' ({'; '.join(problems)})"
        )
    noun = "model" if len(missing) == 1 else "models"
    return ModelError(
        f"{noun} {', '.join(parts)} not usable in {store.root} ({not_fetched_because(offline)})",
        hint=f"fetch with: {fetch_command(missing, store.root)}",
    )


def ensure_models(
    names: list[str],
    *,
    models_dir: str | Path | None = None,
    offline: bool = False,
    interactive: bool = False,
    say: Callable[[str], None] | None = None,
    endpoint: str | None = None,
) -> list[Path]:
    """Local folders for the named models, downloading what is missing only when `may_download`
    allows it; otherwise one ModelError names every missing model and the command that fetches
    them. Reuse this from any command that needs models (stylize, captioners)."""
    store = Store(store_root(models_dir))
    offline = offline_requested(offline)
    missing = {name: p for name in names if (p := store.problems(name))}
    if missing:
        if not may_download(offline, interactive):
            raise _missing_message(store, missing, offline)
        from .hub import download

        for name in missing:
            download(store, name, endpoint=endpoint, say=say, show_bar=interactive)
    return [store.model_path(name) for name in names]


def ensure_model(name: str, **kwargs) -> Path:
    return ensure_models([name], **kwargs)[0]


def resolve_models(
    specs: list[tuple[str | None, str]],
    *,
    models_dir: str | Path | None = None,
    offline: bool = False,
    interactive: bool = False,
    say: Callable[[str], None] | None = None,
    endpoint: str | None = None,
) -> list[Path]:
    """Each (spec, option) pair to a local path: a spec is a model NAME from the manifests or a
    path (`names_a_path`). Paths must exist; names are checked (and fetched, see `ensure_models`) together, so a
    missing pair of models gives one error with one command."""
    manifests = load_manifests()
    resolved: list[Path | str] = []
    for spec, role in specs:
        if not spec:
            raise ModelError(f"no model given for {role}", hint=f"pass {role} NAME or {role} PATH")
        path = Path(spec).expanduser()
        if names_a_path(spec, manifests):
            if not path.exists():
                raise ModelError(f"{role} {spec}: no such file or folder")
            resolved.append(path)
        elif spec in manifests:
            resolved.append(spec)
        else:
            raise ModelError(
                f"{role} {spec}: unknown model name and no such folder",
                hint=f"known models: {', '.join(sorted(manifests))}",
            )
    names = [r for r in resolved if isinstance(r, str)]
    folders = iter(
        ensure_models(
            names, models_dir=models_dir, offline=offline, interactive=interactive, say=say, endpoint=endpoint
        )
        if names
        else []
    )
    return [r if isinstance(r, Path) else next(folders) for r in resolved]
