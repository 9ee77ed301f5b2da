"""Bundles: installed models in one tar file, for machines without a network.

Layout (a plain tar, gzip when the file name ends in .gz / .tgz):

    pasd-bundle.json                {"format": 1, "models": [names]}
    <name>/pasd-model.json          the install record (sizes and sha256 of every file)
    <name>/<file>                   each recorded file, at its path inside the model folder

Import extracts only the recorded files (regular files, safe relative paths) into a staging
folder inside the store, checks every size and sha256 against the record, and only then swaps the
staging folder into place, so a truncated or tampered bundle never becomes an installed model.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, Literal

from ..atomic import write_atomic
from ..errors import ModelError, OutputError
from .local import RECORD_NAME, Record, Store, fetch_command, safe_relative, store_write_error

BUNDLE_INDEX = "pasd-bundle.json"
BUNDLE_FORMAT = 1


def _write_mode(path: Path) -> Literal["w:gz", "w"]:
    return "w:gz" if path.name.endswith((".gz", ".tgz")) else "w"


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def export_models(store: Store, names: list[str], target: Path, say: Callable[[str], None] | None = None) -> None:
    """Write the named installed models to `target`; every file is re-hashed first."""
    say = say or (lambda message: None)
    records: list[Record] = []
    for name in names:
        store.manifest(name)
        problems = store.problems(name, full=True)
        if problems:
            raise ModelError(
                f"cannot export {name}: {'; '.join(problems)}",
                hint=f"fetch or repair it with: {fetch_command([name], store.root)}",
            )
        record = store.read_record(name)
        assert record is not None  # no problems: the record is there
        records.append(record)
    target = Path(target)

    def write(handle: BinaryIO) -> None:
        with tarfile.open(fileobj=handle, mode=_write_mode(target)) as tar:
            _add_bytes(tar, BUNDLE_INDEX, json.dumps({"format": BUNDLE_FORMAT, "models": names}).encode())
            for record in records:
                _add_bytes(tar, f"{record.name}/{RECORD_NAME}", json.dumps(record.to_json(), indent=2).encode())
                for rel in sorted(record.files):
                    tar.add(store.model_dir(record.name) / rel, arcname=f"{record.name}/{rel}", recursive=False)
                say(f"{record.name}: exported {len(record.files)} files")

    try:
        write_atomic(target, write)  # a full disk stays a DeviceError (exit 4)
    except OutputError as exc:
        raise ModelError(str(exc)) from None


def _read_json_member(tar: tarfile.TarFile, name: str) -> dict[str, Any]:
    try:
        member = tar.getmember(name)
        handle = tar.extractfile(member) if member.isfile() else None
        if handle is None:
            raise KeyError(name)
        data = json.loads(handle.read().decode("utf-8"))
    except KeyError:
        raise ModelError(f"not a pasd bundle: {name} is missing") from None
    except ValueError as exc:
        raise ModelError(f"not a pasd bundle: {name} is unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise ModelError(f"not a pasd bundle: {name} is not a JSON object")
    return data


def _extract_checked(tar: tarfile.TarFile, member_name: str, expected: dict[str, Any], target: Path) -> None:
    try:
        member = tar.getmember(member_name)
    except KeyError:
        raise ModelError(f"bundle lacks {member_name}") from None
    if not member.isfile():
        raise ModelError(f"bundle entry {member_name} is not a regular file")
    if member.size != expected["size"]:
        raise ModelError(f"bundle entry {member_name}: size {member.size}, record says {expected['size']}")
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    source = tar.extractfile(member)
    assert source is not None  # a regular file
    with open(target, "wb") as out:
        for chunk in iter(lambda: source.read(1 << 20), b""):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != expected["sha256"]:
        raise ModelError(f"bundle entry {member_name}: sha256 mismatch with its record")


def import_bundle(store: Store, source: Path, say: Callable[[str], None] | None = None) -> list[str]:
    """Install every model in the bundle `source` into `store`; returns their names."""
    say = say or (lambda message: None)
    source = Path(source)
    if not source.is_file():
        raise ModelError(f"{source}: no such bundle file")
    try:
        tar = tarfile.open(source, "r:*")
    except tarfile.TarError:  # its message lists every compression tried, one line each
        raise ModelError(
            f"{source}: not a bundle (not a tar file)", hint="bundles are written by: pasd models export NAME FILE"
        ) from None
    except OSError as exc:
        raise ModelError(f"{source}: cannot read ({exc.strerror or exc})") from None
    try:
        with tar:
            return _import_models(store, tar, source, say)
    except (tarfile.TarError, EOFError) as exc:
        raise ModelError(f"{source}: damaged or truncated bundle ({exc})") from None


def _import_models(store: Store, tar: tarfile.TarFile, source: Path, say: Callable[[str], None]) -> list[str]:
    imported = []
    index = _read_json_member(tar, BUNDLE_INDEX)
    if index.get("format") != BUNDLE_FORMAT or not isinstance(index.get("models"), list):
        raise ModelError(f"{source}: unknown bundle format {index.get('format')!r}")
    for name in index["models"]:
        manifest = store.manifest(str(name))
        try:
            record = Record.from_json(_read_json_member(tar, f"{name}/{RECORD_NAME}"))
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{source}: bad record for {name} ({exc})") from None
        if record.name != name or record.repo_id != manifest.repo_id:
            raise ModelError(f"{source}: the record for {name} describes {record.repo_id}/{record.name}")
        unsafe = [p for p in record.files if not safe_relative(p)]
        lacking = sorted(set(manifest.repo_paths) - set(record.files))
        if unsafe or lacking:
            raise ModelError(
                f"{source}: the bundle's {name} "
                + (f"has unsafe paths {unsafe}" if unsafe else f"lacks {', '.join(lacking)}")
            )
        # Only what the manifest lists is installed, as a download would: anything else in a
        # bundle (a tampered one, or one of another pasd version) is never written.
        unlisted = sorted(set(record.files) - set(manifest.repo_paths))
        if unlisted:
            more = f" and {len(unlisted) - 3} more" if len(unlisted) > 3 else ""
            say(f"{name}: skipped {len(unlisted)} file(s) its manifest does not list: {', '.join(unlisted[:3])}{more}")
            record.files = {rel: record.files[rel] for rel in manifest.repo_paths}
        staging = None
        try:
            store.root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".import-{name}-", dir=store.root))
            for rel, expected in sorted(record.files.items()):
                _extract_checked(tar, f"{name}/{rel}", expected, staging / rel)
            _swap_in(store, name, staging, record)
        except OSError as exc:
            raise store_write_error(f"cannot import {name} into", store, exc) from None
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
        say(f"{name}: imported into {store.model_path(name)}")
        imported.append(name)
    return imported


def _swap_in(store: Store, name: str, staging: Path, record: Record) -> None:
    """Replace the model's folder by the checked staging folder, record written last."""
    store.forget(name)
    final = store.model_dir(name)
    if final.exists():
        _discard(store, name)
    os.replace(staging, final)
    store.write_record(record)


def remove_model(store: Store, name: str) -> bool:
    """Uninstall: the record goes first, so a half-deleted folder never counts as installed."""
    store.manifest(name)
    if not store.model_dir(name).exists():
        return False
    try:
        store.forget(name)
        _discard(store, name)
    except OSError as exc:
        raise store_write_error(f"cannot remove {name} from", store, exc) from None
    return True


def _discard(store: Store, name: str) -> None:
    """Move the model's folder out of the way in one rename, then delete it: an interrupted
    delete leaves a hidden trash folder, never a half-deleted model under its name."""
    trash = Path(tempfile.mkdtemp(prefix=f".trash-{name}-", dir=store.root))
    os.replace(store.model_dir(name), trash / name)
    shutil.rmtree(trash, ignore_errors=True)
