"""Captions cached by image content and describer identity, so a re-run of a batch, or a stylize
run after an upscale run, does not caption again.

Layout: `<directory>/<identity digest>/<image digest>.json`, one small JSON record per image,
written atomically. A record names its identity and image in full and is checked on every read;
anything unreadable or mismatched is a miss and is overwritten by the next store.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from ..atomic import write_atomic
from ..errors import DeviceError, OutputError

if TYPE_CHECKING:
    from ..engine.captions import Description

RECORD_FORMAT = 1


def image_digest(image: Image.Image) -> str:
    """SHA-256 of the decoded pixels the describer sees (mode, size, bytes), not of the file:
    a metadata edit, a lossless re-encode or a copy under another name still hits, while
    anything that changes the pixels (an EXIF rotation included) misses."""
    digest = hashlib.sha256(f"{image.mode} {image.width}x{image.height}\n".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def identity_digest(identity: dict) -> str:
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


class CaptionCache:
    """Counts what happened, for the batch summary: `hits`, `misses`, `stores`, and
    `write_errors` (a cache that cannot be written slows later runs but never fails this one;
    `last_write_error` says why, for the caller to report)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.hits = self.misses = self.stores = self.write_errors = 0
        self.last_write_error: str | None = None

    def path(self, identity: dict, digest: str) -> Path:
        return self.directory / identity_digest(identity) / f"{digest}.json"

    def get(self, identity: dict, digest: str) -> Description | None:
        description = self._read(identity, digest)
        if description is None:
            self.misses += 1
        else:
            self.hits += 1
        return description

    def _read(self, identity: dict, digest: str) -> Description | None:
        from ..engine.captions import Description

        try:
            record = json.loads(self.path(identity, digest).read_text(encoding="utf-8"))
            if (
                record.get("format") != RECORD_FORMAT
                or record.get("identity") != identity
                or record.get("image_sha256") != digest
            ):
                return None
            return Description.from_json(record.get("description"))
        except (OSError, ValueError, AttributeError):
            return None

    def put(self, identity: dict, digest: str, description: Description) -> None:
        record = {
            "format": RECORD_FORMAT,
            "identity": identity,
            "image_sha256": digest,
            "description": description.to_json(),
        }
        data = (json.dumps(record, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
        try:
            write_atomic(self.path(identity, digest), lambda handle: handle.write(data))
        except (OutputError, DeviceError) as exc:  # a cache that cannot be written costs time only
            self.write_errors += 1
            self.last_write_error = f"cannot write the caption cache in {self.directory}: {exc}"
            return
        self.stores += 1
