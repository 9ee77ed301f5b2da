"""The model store on disk: where it is, whether we may go online, and what is installed.

Layout of the store (`--models-dir`, else `PASD_HOME`, else the user's cache folder):

    <root>/<name>/<subfolder>/<files...>    the files, in the hub repo's layout
    <root>/<name>/pasd-model.json           the install record, written atomically, last
    <root>/<name>/.cache/huggingface/       huggingface_hub's local_dir bookkeeping
    <root>/.converted/                      weights converted to a half dtype at a first load,
                                            mapped by later loads; safe to delete

A model is installed only when its record exists and every recorded file has the recorded size
(and, when its modification time changed since the record was written, the recorded sha256).
The record is written after every file was checked against the hub's size and hash, so a file
that was cut short or corrupted is never used. Manifests live in `manifests.py`, downloading in
`hub.py`, bundles in `bundle.py`, and turning what a command names into paths in `resolve.py`;
this module never touches the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..atomic import write_atomic
from ..errors import ModelError
from .manifests import Manifest, get_manifest, load_manifests

RECORD_NAME = "pasd-model.json"
CONVERTED_FOLDER = ".converted"
RECORD_FORMAT = 1
_TRUE = {"1", "true", "yes", "on"}


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


def converted_dir(models_dir: str | Path | None = None, env: Mapping[str, str] | None = None) -> Path:
    """Where weights converted at load are kept (nn/converted_weights.py)."""
    return store_root(models_dir, env) / CONVERTED_FOLDER


def offline_requested(flag: bool = False, env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return flag or any(env.get(v, "").strip().lower() in _TRUE for v in ("PASD_OFFLINE", "HF_HUB_OFFLINE"))


def runs_at_terminal(stdin: IO[str] | None = None, stderr: IO[str] | None = None) -> bool:
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


def store_write_error(doing: str, store: Store, exc: OSError) -> ModelError:
    """A store we may not change (read-only, someone else's): one line, with the way out."""
    return ModelError(
        f"{doing} {store.root}: {exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else ""),
        hint="the store must be writable by you: check its permissions, or use another with --models-dir",
    )


# ---------------------------------------------------------------------------------------------
# Install records and checks


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
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
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = ""

    @property
    def size(self) -> int:
        return sum(f["size"] for f in self.files.values())

    def to_json(self) -> dict[str, Any]:
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
    def from_json(cls, data: dict[str, Any]) -> Record:
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
