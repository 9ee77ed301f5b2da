"""What identifies a model's weights without reading them, for the settings fingerprint every
output records: a store model by its name and the commit it was installed from, a hub base by
its repo and commit, a file or folder by its real path and the sizes and modification times of
its files. Nothing is hashed, so it costs a few stat calls; nothing raises."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import PasdError
from .hub_bases import hub_store, store_name
from .local import Store
from .manifests import Manifest
from .resolve import ModelRef, Origin, locate


def model_identity(ref: ModelRef, root: Path, manifests: Mapping[str, Manifest]) -> dict[str, Any]:
    """`ref`'s weights as they are now; {"spec": ...} alone when it names nothing usable."""
    try:
        located = locate(ref, manifests)
    except PasdError:
        return {"spec": ref.spec}
    if located.origin is Origin.PATH:
        assert located.path is not None
        return {"path": os.path.realpath(located.path), "files": files_digest(located.path)}
    assert located.name is not None
    if located.origin is Origin.HUB:
        hub = hub_store(root, located.name)
        record = hub.read_record(store_name(located.name)) if hub is not None else None
        return {"repo": located.name, "commit": record.commit if record else None}
    record = Store(root, manifests).read_record(located.name)
    return {"name": located.name, "commit": record.commit if record else None}


def files_digest(path: Path) -> str | None:
    """A digest of the sizes and modification times of a file, or of the files in a folder
    (hidden ones aside): it changes when a weight file is replaced. None: nothing there."""
    path = Path(path)
    try:
        if path.is_file():
            stat = path.stat()
            entries = [("", stat.st_size, stat.st_mtime_ns)]
        elif path.is_dir():
            entries = []
            for folder, subfolders, names in os.walk(path):
                subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
                for name in sorted(n for n in names if not n.startswith(".")):
                    stat = os.stat(os.path.join(folder, name))
                    entries.append((os.path.relpath(os.path.join(folder, name), path), stat.st_size, stat.st_mtime_ns))
        else:
            return None
    except OSError:
        return None
    return hashlib.sha256(repr(entries).encode()).hexdigest()[:16]
