"""Manifests: one JSON file per known model in `models/` (shipped in the wheel as
pasd_cli/models), data only: the hub repo, revision, subfolder and files, the kind of model,
what it needs beside it, its licence. Also the model names the commands use by default."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelError

KINDS = ("pasd", "base", "captioner", "classifier", "lora")
UNCONFIRMABLE = ("subfolder", "entry", "files")  # where a manifest says where the files are
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")

# Model names from models/*.json that the commands use, and `pasd download` fetches, by default.
PASD_MODEL = "pasd"  # `pasd upscale`'s PASD model
BASE_MODEL = "sd15"  # Stable Diffusion 1.5, for every command
# The captioner and classifier of --caption blip and --caption classify. `pasd download` fetches
# the captioner with the default PASD model, as upscale captions by default.
CAPTION_MODEL = "blip"
CLASSIFY_MODEL = "resnet-50"
STYLIZE_PASD = "pasd-light"  # stylization's PASD model: the authors advise the light variant
COLORIZE_PASD = "pasd-light-color"  # `pasd colorize`'s: PASD-light trained on grayscale hints
LCM_LORA = "lcm-lora-sdv1-5"  # `pasd stylize --fast`


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
    variant: Mapping[str, Any] | None = None
    note: str = ""
    # Fields ("subfolder", "entry", "files") that are guesses not checked against the hub: a
    # download that does not find them says so.
    unconfirmed: tuple[str, ...] = ()

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
            unconfirmed=tuple(data.get("unconfirmed", ())),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"bad model manifest {path}: {exc}") from None
    if manifest.name != path.stem or not _NAME.match(manifest.name):
        raise ModelError(f"bad model manifest {path}: name {manifest.name!r} must equal the file name")
    if manifest.kind not in KINDS:
        raise ModelError(f"bad model manifest {path}: kind {manifest.kind!r} is not one of {', '.join(KINDS)}")
    if not set(manifest.unconfirmed) <= set(UNCONFIRMABLE):
        raise ModelError(f"bad model manifest {path}: unconfirmed may name only {', '.join(UNCONFIRMABLE)}")
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
    return with_needs([PASD_MODEL, BASE_MODEL, CAPTION_MODEL])
