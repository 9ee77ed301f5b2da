"""Personalized bases named by hub repo id (`pasd stylize --base owner/name`).

Such a repo has no manifest in `models/`, so the files to fetch are picked from the repo's file
list: the diffusers parts a base can replace (unet/, vae/, text_encoder/, tokenizer/), their
configs and their safetensors weights, nothing else (no pickles, no safety checker, no
single-file copies). The download itself is `hub.download` with a manifest made on the spot, so
it gets the same hash checks, resumption and one-line errors; the store keeps the base in
`<store>/hub--owner--name/` with its install record, and that record is what makes the base
usable offline later. `resolve.py` decides when a base is fetched.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path

from ..engine.formats import PART_STEMS, PICKLE_SUFFIXES
from ..errors import ModelError
from .local import Store, offline_requested
from .manifests import Manifest

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


def is_repo_id(spec: str) -> bool:
    """owner/name, and not a file name (a path to a missing .safetensors stays a path)."""
    return bool(_REPO_ID.match(spec)) and not spec.lower().endswith(_WEIGHT_SUFFIXES)


def store_name(repo_id: str) -> str:
    return "hub--" + repo_id.replace("/", "--")


def _manifest(repo_id: str, files: Iterable[str]) -> Manifest:
    return Manifest(
        name=store_name(repo_id),
        kind="base",
        description=f"{repo_id} (personalized base)",
        repo_id=repo_id,
        revision="main",
        subfolder="",
        files=tuple(sorted(files)),
        license="see the model card on the hub",
    )


def _part_files(listing: set[str], repo_id: str, folder: str, stem: str) -> list[str]:
    """A part's config and safetensors weights (single, fp16, or sharded with its index); [] when
    the repo has no such part."""
    prefix = f"{folder}/" if folder else ""
    config = f"{prefix}config.json"
    if config not in listing:
        return []
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
        if prefix + name in listing:
            return [config, prefix + name]
    index = f"{prefix}{stem}.safetensors.index.json"
    shard = re.compile(re.escape(prefix + stem) + r"-\d+-of-\d+\.safetensors")
    shards = sorted(p for p in listing if shard.fullmatch(p))
    if index in listing and shards:
        return [config, index, *shards]
    raise ModelError(
        f"{repo_id}: {folder or 'the repo root'} has no safetensors weights (pickled weights are never downloaded)",
        hint="download the weights yourself, convert them to .safetensors and pass the folder",
    )


def pick_base_files(listing: Iterable[str], repo_id: str) -> list[str]:
    """The files of `listing` (paths in the repo) that make a base: a diffusers model (unet/ and
    what it has of vae/, text_encoder/, tokenizer/) or a lone UNet at the repo root."""
    listing = set(listing)
    if "text_encoder_2/config.json" in listing:
        raise ModelError(f"{repo_id} is an SDXL model; PASD's bases must be Stable Diffusion 1.5 models")
    if "unet/config.json" in listing:
        files = []
        for part, stem in PART_STEMS.items():
            files += _part_files(listing, repo_id, part, stem)
        files += sorted(
            p
            for p in listing
            if p.startswith("tokenizer/")
            and "/" not in p[len("tokenizer/") :]
            and not p.lower().endswith(_WEIGHT_SUFFIXES)
        )
        return files
    files = _part_files(listing, repo_id, "", PART_STEMS["unet"])
    if files:
        return files
    raise ModelError(
        f"{repo_id} is not a Stable Diffusion model in diffusers layout (no unet/config.json)",
        hint="for a single-file checkpoint, download the .safetensors file and pass its path to --base",
    )


def hub_store(root: Path, repo_id: str) -> Store | None:
    """A store that knows the base `repo_id` by its install record (None: never installed); its
    `problems()` say whether the files are intact."""
    name = store_name(repo_id)
    record = Store(root, manifests={}).read_record(name)
    if record is None or record.repo_id != repo_id:
        return None
    return Store(root, manifests={name: _manifest(repo_id, record.files)})


def download_hub_base(
    root: Path,
    repo_id: str,
    *,
    say: Callable[[str], None] | None = None,
    show_bar: bool = False,
    endpoint: str | None = None,
    token: str | None = None,
) -> Path:
    """Fetch (or repair) the base `repo_id` into the store at `root`; its local folder."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.hf_api import RepoFile

    from .hub import download, hub_errors

    say = say or (lambda message: None)
    name = store_name(repo_id)
    installed = hub_store(Path(root), repo_id)
    if installed is not None and not installed.problems(name, full=True):
        say(f"{repo_id}: already installed and verified in {installed.model_dir(name)}")
        return installed.model_path(name)
    if offline_requested():
        raise ModelError(f"cannot download {repo_id}: offline mode is on (PASD_OFFLINE or HF_HUB_OFFLINE)")
    probe = _manifest(repo_id, ())
    endpoint_url = endpoint or constants.ENDPOINT
    with hub_errors(probe, endpoint_url):
        listing = [
            entry.path
            for entry in HfApi(endpoint=endpoint, token=token).list_repo_tree(
                repo_id, recursive=True, revision=probe.revision
            )
            if isinstance(entry, RepoFile)
        ]
    store = Store(Path(root), manifests={name: _manifest(repo_id, pick_base_files(listing, repo_id))})
    download(store, name, endpoint=endpoint, token=token, say=say, show_bar=show_bar)
    return store.model_path(name)
