"""Turning the command's input arguments (files, folders, quoted globs, `-` for a list on stdin)
into candidate files, with the reason for everything left out.

Nothing here opens an image: recognising files by content is the planner's job (`imageio.probe`).
"""

from __future__ import annotations

import fnmatch
import glob
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ..errors import UsageError
from ..imageio import IMAGE_SUFFIXES, OTHER_IMAGE_SUFFIXES

_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Candidate:
    path: Path
    rel: Path  # where it sits below the folder or glob root it was found in; just the name otherwise
    found: bool  # found by walking a folder or a glob, rather than named by the user


@dataclass(frozen=True)
class Ignored:
    path: Path
    reason: str
    image_like: bool  # has an image extension: reported as a skipped input, not just logged


@dataclass
class Discovery:
    candidates: list[Candidate]
    ignored: list[Ignored]
    empty_specs: list[str]  # globs, folders and stdin lists that held no images


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def has_image_suffix(path: Path) -> bool:
    """Named like an image, read or not: the planner reads its header and refuses what it cannot
    read with a reason, so no image goes unreported."""
    suffix = path.suffix.lower()
    return suffix in IMAGE_SUFFIXES or suffix in OTHER_IMAGE_SUFFIXES


def find_inputs(specs: Iterable[str], recursive: bool = False, stdin: TextIO | None = None) -> Discovery:
    found = Discovery([], [], [])
    for spec in specs:
        before = len(found.candidates)
        if spec == "-":
            for line in stdin.read().splitlines() if stdin is not None else []:
                if line.strip():
                    _add_named(Path(line), recursive, found, from_list=True)
        else:
            _add_named(Path(spec).expanduser(), recursive, found, from_list=False, spec=spec)
        if len(found.candidates) == before:
            found.empty_specs.append("- (the list on stdin)" if spec == "-" else spec)
    found.candidates = _unique(found.candidates)
    return found


def _add_named(path: Path, recursive: bool, found: Discovery, from_list: bool, spec: str = "") -> None:
    if path.is_dir():
        _walk(path, recursive, found)
    elif path.is_file() or from_list:
        # Named files are taken as given, hidden or not, whatever their extension; a missing file
        # on a list becomes a failed input when planned.
        found.candidates.append(Candidate(path, Path(path.name), found=False))
    elif _GLOB_CHARS & set(spec):
        _glob(spec, recursive, found)
    else:
        raise UsageError(f"{spec}: no such file or folder")


def _walk(root: Path, recursive: bool, found: Discovery) -> None:
    for folder, dirs, files in os.walk(root):  # symlinked folders are not followed: no loops
        if recursive:
            found.ignored.extend(
                Ignored(Path(folder) / d, "hidden folder", image_like=False) for d in sorted(dirs) if is_hidden(d)
            )
        dirs[:] = sorted(d for d in dirs if recursive and not is_hidden(d))
        for name in sorted(files):
            _consider(Path(folder) / name, root, found)


def _consider(path: Path, root: Path, found: Discovery) -> None:
    if not has_image_suffix(path):
        found.ignored.append(Ignored(path, "not an image file name", image_like=False))
    elif is_hidden(path.name):
        found.ignored.append(Ignored(path, "hidden file", image_like=True))
    elif not path.is_file():
        found.ignored.append(Ignored(path, "not a regular file", image_like=True))
    else:
        found.candidates.append(Candidate(path, path.relative_to(root), found=True))


def _glob(spec: str, recursive: bool, found: Discovery) -> None:
    """A quoted glob; its last part matches names case-insensitively, so `*.jpg` finds `A.JPG`."""
    folder_pattern, name_pattern = os.path.split(os.path.expanduser(spec))
    root = _glob_root(folder_pattern)
    name_pattern = name_pattern.lower()
    folders = sorted(glob.glob(folder_pattern or ".", recursive=True)) if folder_pattern else ["."]
    for folder in folders:
        if _GLOB_CHARS & set(folder_pattern) and any(is_hidden(p) for p in Path(folder).relative_to(root).parts):
            continue
        for path in _files_in(Path(folder)):
            if fnmatch.fnmatchcase(path.name.lower(), name_pattern):
                _consider(path, root, found)


def _glob_root(folder_pattern: str) -> Path:
    parts = []
    for part in Path(folder_pattern).parts:
        if _GLOB_CHARS & set(part):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def _files_in(folder: Path) -> Iterator[Path]:
    try:
        yield from sorted(p for p in folder.iterdir() if p.is_file())
    except OSError:
        return


def _unique(candidates: list[Candidate]) -> list[Candidate]:
    """The same file named twice (as a file and inside a folder) is one input."""
    seen: set[str] = set()
    unique = []
    for candidate in candidates:
        key = os.path.realpath(candidate.path)
        if key not in seen:
            seen.add(key)
            unique.append(candidate)
    return unique
