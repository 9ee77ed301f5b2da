"""Outputs made with other settings. Every output records a fingerprint of what decides its
pixels (`Command.fingerprint`: settings, models, the image's description); a re-run compares it
with the fingerprint it would record now. With `--on-exists skip` such outputs are still skipped,
and counted; with `--on-exists if-stale` they are made again. An existing file without pasd's
record is not ours: it is never replaced by if-stale."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .plan import OUTPUT_EXISTS, SKIPPED, TODO, Job, Plan

# The JSON record's field naming the settings a skipped (or redone) output was made with otherwise.
OTHER_SETTINGS = "other_settings"
# The summary's count of outputs skipped though made with other settings.
SKIPPED_OTHER_SETTINGS = "skipped_other_settings"
NOT_OURS = "not made by pasd"
UNRECORDED = "settings"  # a record from a pasd that wrote no fingerprint: what it was made with is unknown

Fingerprint = Callable[[Job], "dict[str, Any] | None"]


def canonical(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """As it reads back from an output's metadata (JSON: tuples become lists, and so on)."""
    result: dict[str, Any] = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
    return result


def recorded(path: Path) -> dict[str, Any] | str:
    """The fingerprint an output records, from its header; NOT_OURS when it has no pasd record,
    UNRECORDED when its record has no fingerprint."""
    from PIL import Image

    from ..imageio.metadata import read_record

    try:
        with Image.open(path) as image:
            record = read_record(image)
    except Exception:  # unreadable, or not an image: not something pasd wrote
        return NOT_OURS
    if not isinstance(record, dict):
        return NOT_OURS
    found = record.get("fingerprint")
    return found if isinstance(found, dict) else UNRECORDED


def differences(then: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The names of what differs: a setting's own name, else the fingerprint's part."""
    names: list[str] = []
    for key in sorted(set(then) | set(now)):
        old, new = then.get(key), now.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict) and key == "settings":
            names += [name for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]
        else:
            names.append(key)
    return names


def mark_stale(plan: Plan, on_exists: str, fingerprint: Fingerprint) -> int:
    """Compare every skipped existing output with what this run would make; returns how many are
    skipped though made with other settings (if-stale puts them back to do instead)."""
    skipped_other = 0
    for job in plan.jobs:
        if job.status != SKIPPED or job.reason != OUTPUT_EXISTS or job.output is None:
            continue
        now = fingerprint(job)
        if now is None:  # the command records none
            return 0
        then = recorded(job.output)
        if then == NOT_OURS:
            job.reason = f"{OUTPUT_EXISTS} ({NOT_OURS})"
            continue
        changed = [UNRECORDED] if isinstance(then, str) else differences(then, canonical(now))
        if not changed:
            continue
        job.extra[OTHER_SETTINGS] = changed
        if on_exists == "if-stale":
            job.status, job.reason = TODO, None
        else:
            job.reason = f"{OUTPUT_EXISTS}, made with other settings ({', '.join(changed)})"
            skipped_other += 1
    return skipped_other
