"""Fetching models from the Hugging Face hub (or the `HF_ENDPOINT` mirror) into the store.

huggingface_hub does the transfers: `HF_ENDPOINT`, `HF_TOKEN`, proxies, Xet storage, and
resuming a connection cut midway (it retries with a Range request). Only the manifest's files are
fetched, one `hf_hub_download(local_dir=...)` each. What we add: every file is checked against
the size and hash the hub lists for it (sha256 for LFS files, the git blob id otherwise) before
the install record is written, files already present and correct are kept (a rerun after an
interruption fetches only what is missing), the free disk space is checked first, and every
failure becomes one ModelError line.
"""

from __future__ import annotations

import errno
import hashlib
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import ModelError
from .local import Record, Store, offline_requested, store_write_error
from .manifests import Manifest

FreeSpace = Callable[[Path], int]


def disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


def human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def file_digests(path: Path) -> tuple[str, str]:
    """(sha256, git blob sha1) of a file, in one pass."""
    sha256 = hashlib.sha256()
    git_sha1 = hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha256.update(chunk)
            git_sha1.update(chunk)
    return sha256.hexdigest(), git_sha1.hexdigest()


def _expected(remote: Any) -> tuple[str, str]:
    """(algorithm, hex digest) the hub lists for a file."""
    if remote.lfs is not None:
        return "sha256", remote.lfs.sha256
    return "git-sha1", remote.blob_id


def _check_file(path: Path, remote: Any) -> tuple[str | None, str]:
    """(problem or None, sha256) of a local file against its hub entry."""
    if not path.is_file():
        return "missing", ""
    size = path.stat().st_size
    if size != remote.size:
        return f"size {size}, hub says {remote.size}", ""
    sha256, git_sha1 = file_digests(path)
    algorithm, expected = _expected(remote)
    actual = sha256 if algorithm == "sha256" else git_sha1
    if actual != expected:
        return f"{algorithm} {actual[:12]}..., hub says {expected[:12]}...", sha256
    return None, sha256


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        if line.strip() and not line.strip().endswith("Client Error."):
            return line.strip()
    return type(exc).__name__


def _is_network_error(exc: BaseException) -> bool:
    http: Any
    try:
        import httpx2 as http
    except ImportError:  # huggingface_hub releases before httpx2
        import httpx as http  # type: ignore[import-not-found,no-redef]
    return isinstance(exc, (http.TransportError, ConnectionError, TimeoutError))


@contextmanager
def hub_errors(manifest: Manifest, endpoint: str, path: str | None = None) -> Iterator[None]:
    """Translate huggingface_hub / network / disk failures into one-line ModelErrors."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo = manifest.repo_id
    token_hint = "set HF_TOKEN to a token that can read it (and accept its terms on the hub if it is gated)"
    try:
        yield
    except ModelError:
        raise
    except OfflineModeIsEnabled:
        raise ModelError("offline mode is on (HF_HUB_OFFLINE)", hint="unset HF_HUB_OFFLINE to download") from None
    except GatedRepoError as exc:
        raise ModelError(
            f"access to {repo} refused (HTTP {exc.response.status_code}): {_first_line(exc)}", hint=token_hint
        ) from None
    except RepositoryNotFoundError as exc:
        status = exc.response.status_code
        if status == 401:
            raise ModelError(
                f"repository {repo} not found at {endpoint}, or access refused (HTTP 401)", hint=token_hint
            ) from None
        raise ModelError(
            f"repository {repo} not found at {endpoint}", hint="check HF_ENDPOINT and the manifest's repo_id"
        ) from None
    except RevisionNotFoundError:
        raise ModelError(f"revision '{manifest.revision}' not found in {repo} at {endpoint}") from None
    except EntryNotFoundError as exc:
        if isinstance(exc, LocalEntryNotFoundError) and exc.__cause__ is not None:
            raise ModelError(
                f"cannot reach {endpoint}: {_first_line(exc.__cause__)}",
                hint="check the network (or HF_ENDPOINT); without one: pasd models import FILE",
            ) from None
        raise ModelError(f"file {path or '?'} not found in {repo}@{manifest.revision} at {endpoint}") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code
        if status in (401, 403):
            raise ModelError(f"access to {repo} refused (HTTP {status})", hint=token_hint) from None
        raise ModelError(f"the hub at {endpoint} answered HTTP {status} for {repo}: {_first_line(exc)}") from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ModelError(
                f"disk full while writing {path or repo}", hint="free some space or pass --models-dir on a bigger disk"
            ) from None
        if "Consistency check failed" in str(exc):
            raise ModelError(
                f"download of {path} stopped short: {_first_line(exc)}",
                hint="run the same command again; finished files are kept",
            ) from None
        if _is_network_error(exc):
            raise ModelError(f"cannot reach {endpoint}: {_first_line(exc)}") from None
        raise ModelError(f"cannot write {path or repo}: {exc}") from None
    except Exception as exc:
        if _is_network_error(exc):
            where = f"download of {path} was cut off" if path else f"cannot reach {endpoint}"
            raise ModelError(
                f"{where}: {_first_line(exc)}",
                hint="check the network (or HF_ENDPOINT) and run the same command again; finished files are kept",
            ) from None
        raise


def _existing_parent(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path.cwd()


def check_free_space(folder: Path, needed: int, free_space: FreeSpace = disk_free) -> None:
    where = _existing_parent(folder)
    free = free_space(where)
    if free < needed:
        raise ModelError(
            f"not enough disk space: {human_size(needed)} to download, {human_size(free)} free in {where}",
            hint="free some space or pass --models-dir on a bigger disk",
        )


def _progress_into(bar: Any) -> type:
    """A tqdm stand-in for huggingface_hub that adds every file's bytes to one shared bar."""

    class IntoSharedBar:
        total = None
        n = 0

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def __enter__(self) -> IntoSharedBar:
            return self

        def __exit__(self, *exc_info: object) -> None:
            return None

        def update(self, n: int = 1) -> None:
            if n:
                bar.update(n)

        def update_transfer(self, n: int = 1) -> None:
            pass  # Xet reports network bytes separately; the bar counts bytes written

        def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
            pass

        def set_transfer_postfix_str(self, *args: Any, **kwargs: Any) -> None:
            pass

        def refresh(self, *args: Any, **kwargs: Any) -> None:
            pass

        def close(self) -> None:
            pass

    return IntoSharedBar


def _quiet_hub_logs() -> None:
    # Its retry warnings span several lines; our bar and our one-line errors say what matters.
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()


def _remote_files(api: Any, manifest: Manifest, commit: str, endpoint: str) -> dict[str, Any]:
    """The hub's files below the manifest's subfolder, by path; a missing subfolder is a
    one-line error that names the manifest field to fix."""
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    from huggingface_hub.hf_api import RepoFile

    tree = {"repo_type": manifest.repo_type, "revision": commit}
    try:
        entries = api.list_repo_tree(manifest.repo_id, path_in_repo=manifest.subfolder or None, recursive=True, **tree)
        return {entry.path: entry for entry in entries if isinstance(entry, RepoFile)}
    except EntryNotFoundError as exc:
        if isinstance(exc, LocalEntryNotFoundError) or not manifest.subfolder:
            raise
    parent = manifest.subfolder.rpartition("/")[0]
    try:  # what is there instead, to fix the manifest by
        found = sorted(
            entry.path.rpartition("/")[2] for entry in api.list_repo_tree(manifest.repo_id, parent or None, **tree)
        )
    except Exception:  # only decorates the error below
        found = []
    raise _not_found(manifest, "subfolder", f"folder {manifest.subfolder}", endpoint, parent, found)


def _files_not_found(manifest: Manifest, absent: list[str], remote: dict[str, Any], endpoint: str) -> ModelError:
    """Files of the manifest the hub lacks: a wrong `entry` (the checkpoint folder) when nothing
    is under it, else a wrong `files` list."""
    more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
    what = f"file {absent[0]}{more}"
    entry = f"{manifest.entry_path}/"
    if manifest.entry and not any(path.startswith(entry) for path in remote):
        prefix = f"{manifest.subfolder}/" if manifest.subfolder else ""
        found = sorted({path[len(prefix) :].split("/")[0] for path in remote})
        return _not_found(manifest, "entry", what, endpoint, manifest.subfolder, found)
    return _not_found(manifest, "files", what, endpoint, manifest.subfolder, [])


def _not_found(manifest: Manifest, field: str, what: str, endpoint: str, folder: str, found: list[str]) -> ModelError:
    """`what` is not on the hub where the manifest's `field` says: one line that names the field
    to fix, says whether it was a guess, and lists what `folder` holds instead."""
    from .manifests import manifests_dir

    path = manifests_dir() / f"{manifest.name}.json"
    manifest_file = str(path) if path.is_file() else f"the manifest {manifest.name}.json"
    value = getattr(manifest, field)
    if field in manifest.unconfirmed:
        why = f"the manifest's {field} {value!r} is an unconfirmed guess" if field != "files" else "it was a guess"
    else:
        why = "the manifest may be out of date"
    fix = "`entry` (and the paths in `files` under it)" if field == "entry" else f"`{field}`"
    holds = (
        f" ({folder or 'the repo'} holds: {', '.join(found[:8])}{', ...' if len(found) > 8 else ''})" if found else ""
    )
    repo = f"{manifest.repo_id}@{manifest.revision}"
    return ModelError(
        f"{what} not found in {repo} at {endpoint}; {why}: fix {fix} in {manifest_file}{holds}",
        hint=f"see the files at {endpoint.rstrip('/')}/{manifest.repo_id}/tree/{manifest.revision}/{folder}".rstrip(
            "/"
        ),
    )


def download(
    store: Store,
    name: str,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    say: Callable[[str], None] | None = None,
    show_bar: bool = False,
    free_space: FreeSpace = disk_free,
) -> Record:
    """Install `name` into `store`, or repair it; returns the written record. Needs the network
    unless the model is already installed and every file's hash matches its record."""
    say = say or (lambda message: None)
    manifest = store.manifest(name)
    if not store.problems(name, full=True):
        record = store.read_record(name)
        assert record is not None  # no problems: the record is there
        say(f"{name}: already installed and verified ({human_size(record.size)}) in {store.model_dir(name)}")
        return record
    if offline_requested():
        raise ModelError(
            f"cannot download {name}: offline mode is on (PASD_OFFLINE or HF_HUB_OFFLINE)",
            hint="unset them, or bring the model on a bundle: pasd models import FILE",
        )

    from huggingface_hub import HfApi, constants, hf_hub_download

    _quiet_hub_logs()
    endpoint_url = endpoint or constants.ENDPOINT
    api = HfApi(endpoint=endpoint, token=token)
    with hub_errors(manifest, endpoint_url):
        commit = api.repo_info(manifest.repo_id, repo_type=manifest.repo_type, revision=manifest.revision).sha
        remote = _remote_files(api, manifest, commit, endpoint_url)
    absent = [p for p in manifest.repo_paths if p not in remote]
    if absent:
        raise _files_not_found(manifest, absent, remote, endpoint_url)

    model_dir = store.model_dir(name)
    try:
        store.forget(name)  # from here on the model counts as not installed until every file checks out
    except OSError as exc:
        raise store_write_error(f"cannot download {name} into", store, exc) from None
    files: dict[str, dict[str, Any]] = {}
    to_fetch: list[str] = []
    for rel in manifest.repo_paths:
        problem, sha256 = _check_file(model_dir / rel, remote[rel])
        if problem is None:
            files[rel] = {"size": remote[rel].size, "sha256": sha256}
        else:
            to_fetch.append(rel)
    needed = sum(remote[rel].size for rel in to_fetch)
    check_free_space(model_dir, needed, free_space)
    kept = f", {len(files)} already present" if files else ""
    say(
        f"{name}: fetching {len(to_fetch)} file(s), {human_size(needed)}, from {manifest.repo_id} "
        f"at {endpoint_url}{kept}"
    )

    from tqdm.auto import tqdm

    with tqdm(
        total=needed, desc=name, unit="B", unit_scale=True, file=sys.stderr, disable=not show_bar, leave=False
    ) as bar:
        for rel in to_fetch:
            if not show_bar:
                say(f"{name}: {rel} ({human_size(remote[rel].size)})")
            (model_dir / rel).unlink(missing_ok=True)
            with hub_errors(manifest, endpoint_url, rel):
                hf_hub_download(
                    manifest.repo_id,
                    rel,
                    repo_type=manifest.repo_type,
                    revision=commit,
                    local_dir=model_dir,
                    endpoint=endpoint,
                    token=token,
                    tqdm_class=_progress_into(bar),
                )
            problem, sha256 = _check_file(model_dir / rel, remote[rel])
            if problem is not None:
                (model_dir / rel).unlink(missing_ok=True)
                raise ModelError(
                    f"hash mismatch for {rel} of {name}: {problem}; the file was deleted",
                    hint="run the same command again; if it persists, the mirror is serving a bad file",
                )
            files[rel] = {"size": remote[rel].size, "sha256": sha256}

    record = Record(
        name=name,
        repo_id=manifest.repo_id,
        revision=manifest.revision,
        commit=commit,
        subfolder=manifest.subfolder,
        entry=manifest.entry,
        files=files,
        source=f"{endpoint_url} {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
    )
    store.write_record(record)
    say(f"{name}: installed in {store.model_path(name)}")
    return record
