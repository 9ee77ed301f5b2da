"""Issue 13, item 12: `pasd models remove` on a store it may not change is one error line, not
a traceback; `pasd models import` installs only the files the model's manifest lists.

The store is made by hand (files with the sizes and hashes of their record), so no hub is needed.
The tests run as any user, root included, so a read-only file system is injected where the
store changes: os calls that fail with EROFS, as they would on a read-only mount."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from hardening import pasd_in_process

from pasd_cli.store import Store
from pasd_cli.store.bundle import export_models
from pasd_cli.store.local import Record, sha256_file

MODEL = "sd15"


def fake_install(root: Path, extra: dict[str, bytes] | None = None) -> Store:
    """MODEL installed under `root` with placeholder files (and `extra` ones in its record)."""
    store = Store(root)
    manifest = store.manifest(MODEL)
    contents = {rel: f"placeholder {rel}".encode() for rel in manifest.repo_paths} | (extra or {})
    files = {}
    for rel, data in contents.items():
        path = store.model_dir(MODEL) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files[rel] = {"size": len(data), "sha256": sha256_file(path)}
    record = Record(MODEL, manifest.repo_id, manifest.revision, "0" * 40, manifest.subfolder, manifest.entry, files)
    store.write_record(record)
    assert store.installed(MODEL)
    return store


def read_only(monkeypatch, root: Path) -> None:
    """Every change below `root` fails as on a read-only mount."""

    def refuse(original):
        def call(path, *args, **kwargs):
            if str(os.fspath(path)).startswith(str(root)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
            return original(path, *args, **kwargs)

        return call

    for name in ("unlink", "rename", "replace", "mkdir", "rmdir"):
        monkeypatch.setattr(os, name, refuse(getattr(os, name)))


def test_removing_from_a_read_only_store_is_one_error_line_and_changes_nothing(capsys, monkeypatch, tmp_path):
    store = fake_install(tmp_path / "store")
    read_only(monkeypatch, store.root)
    run = pasd_in_process(capsys, "models", "remove", MODEL, "--models-dir", store.root)
    monkeypatch.undo()
    assert run.code == 3, run.stderr
    error = run.one_error()
    assert f"cannot remove {MODEL} from {store.root}" in error and "Read-only file system" in error
    assert "hint: the store must be writable" in run.stderr
    assert store.installed(MODEL)


def test_importing_into_a_read_only_store_is_one_error_line(capsys, monkeypatch, tmp_path):
    bundle = tmp_path / "bundle.tar"
    export_models(fake_install(tmp_path / "store"), [MODEL], bundle)
    target = tmp_path / "other"
    read_only(monkeypatch, target)
    run = pasd_in_process(capsys, "models", "import", bundle, "--models-dir", target)
    monkeypatch.undo()
    assert run.code == 3, run.stderr
    assert f"cannot import {MODEL} into {target}" in run.one_error()


def test_import_installs_only_the_files_the_manifest_lists(capsys, tmp_path):
    store = fake_install(tmp_path / "store", extra={"run_me.py": b"import os\n"})
    bundle = tmp_path / "bundle.tar"
    export_models(store, [MODEL], bundle)

    target = Store(tmp_path / "other")
    run = pasd_in_process(capsys, "models", "import", bundle, "--models-dir", target.root)
    assert run.code == 0, run.stderr
    assert "skipped 1 file(s) its manifest does not list: run_me.py" in run.stderr
    assert not (target.model_dir(MODEL) / "run_me.py").exists()
    assert target.installed(MODEL)
    record = target.read_record(MODEL)
    assert record is not None and sorted(record.files) == sorted(target.manifest(MODEL).repo_paths)


def test_repairing_a_model_in_a_read_only_store_is_one_model_error(monkeypatch, tmp_path):
    """A sibling: `pasd download` over a damaged model first marks it not installed, a change."""
    from conftest import REFERENCE
    from hub_server import FakeHub, tiny_hub_repos

    from pasd_cli.errors import ModelError
    from pasd_cli.store.hub import download

    store = fake_install(tmp_path / "store")
    damaged = store.model_dir(MODEL) / store.manifest(MODEL).repo_paths[0]
    damaged.write_bytes(b"cut")  # so a repair is due
    with FakeHub(tiny_hub_repos(REFERENCE)) as hub:
        read_only(monkeypatch, store.root)
        with pytest.raises(ModelError, match=f"cannot download {MODEL} into {store.root}: Read-only file system"):
            download(store, MODEL, endpoint=hub.url)
