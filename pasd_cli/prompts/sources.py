"""Where each image's high-level information comes from, in this order: a sidecar text file
beside the image, the `--prompt-file` CSV, the describer (BLIP caption or ImageNet class,
through the cache), or nothing.

A per-image text (sidecar or CSV) takes the place of the caption: no caption is computed for
that image. It is the user's own description, so it is neither cleaned ("blurry" stays) nor glued
to the added prompt; it is combined like the released classify label, after `--prompt`:
"[<--prompt>, ]<text>, <added prompt>". An empty text means "no description": the image gets
the `--caption none` prompt.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from PIL import Image

from ..engine.settings import CAPTION_SEPARATOR
from ..errors import InputError, ModelError, UsageError
from .cache import CaptionCache, image_digest

if TYPE_CHECKING:  # torch: loaded only when an image is described
    from ..engine.captions import Describer, Description

SIDECAR_SUFFIX = ".txt"
SIDECAR_MAX_BYTES = 16 * 1024
PROMPT_FILE_HEADER = ("file", "prompt")


def normalize_text(text: str) -> str:
    """Runs of whitespace (line breaks included) become one space; a trailing comma goes, since
    the combination rule adds its own ", "."""
    return " ".join(text.split()).rstrip(", ")


class SidecarError(InputError):
    """A sidecar that cannot be used: this image fails, but the fault is the text file's, so the
    image is not remembered as a bad input."""


def sidecar_path(image_path: Path) -> Path:
    return image_path.with_suffix(SIDECAR_SUFFIX)


def read_sidecar(image_path: Path) -> str | None:
    """The text of `<stem>.txt` beside the image (UTF-8, a BOM allowed), normalized; None when
    there is none. A sidecar that cannot be used fails this image only (InputError)."""
    path = sidecar_path(image_path)
    if not path.is_file():
        return None
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SidecarError(f"{path}: cannot read prompt sidecar ({exc.strerror or exc})") from None
    if len(data) > SIDECAR_MAX_BYTES:
        raise SidecarError(
            f"{path}: prompt sidecar is {len(data)} bytes; at most {SIDECAR_MAX_BYTES}",
            hint="a sidecar holds one prompt; CLIP reads only its first 77 tokens",
        )
    try:
        return normalize_text(data.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise SidecarError(f"{path}: prompt sidecar is not UTF-8 text") from None


def _csv_rows(text: str, where: str):
    """(line number, row) for each row that is not blank."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise UsageError(f"{where}, line {reader.line_num}: not valid CSV ({exc})") from None
        if any(cell.strip() for cell in row):
            yield reader.line_num, row


class PromptFile:
    """`--prompt-file`: a CSV of `file,prompt` rows (an optional `file,prompt` header first).
    `file` is an image's file name ("photo.jpg", for every input of that name) or a path
    relative to the CSV's folder ("shoot/photo.jpg"); a path match wins over a name match. A
    prompt with commas must be quoted, as CSV does. Any malformed row refuses the whole file
    (UsageError), before any work."""

    def __init__(self, path: Path, entries: dict[str, str]):
        self.path = Path(path)
        self.entries = entries
        base = self.path.parent
        self._by_path = {(base / key).resolve(): key for key in entries}
        self._used: set[str] = set()

    @classmethod
    def read(cls, path: Path) -> PromptFile:
        path = Path(path)
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except FileNotFoundError:
            raise UsageError(f"--prompt-file {path}: no such file") from None
        except OSError as exc:
            raise UsageError(f"--prompt-file {path}: cannot read ({exc.strerror or exc})") from None
        except UnicodeDecodeError:
            raise UsageError(f"--prompt-file {path}: not UTF-8 text") from None
        entries: dict[str, str] = {}
        for index, (line, row) in enumerate(_csv_rows(text, f"--prompt-file {path}")):
            if index == 0 and tuple(cell.strip().lower() for cell in row) == PROMPT_FILE_HEADER:
                continue
            where = f"--prompt-file {path}, line {line}"
            if len(row) != 2:
                raise UsageError(
                    f"{where}: {len(row)} fields; expected 2 (file,prompt)",
                    hint='quote a prompt that holds commas: photo.jpg,"a dog, on grass"',
                )
            key, prompt = row[0].strip(), normalize_text(row[1])
            if not key:
                raise UsageError(f"{where}: empty file name")
            if key in entries:
                raise UsageError(f"{where}: {key} is listed twice")
            entries[key] = prompt
        return cls(path, entries)

    def key_for(self, image_path: Path) -> str | None:
        """The row that describes the image, without counting it as used."""
        key = self._by_path.get(Path(image_path).resolve())
        if key is None and Path(image_path).name in self.entries:
            key = Path(image_path).name
        return key

    def lookup(self, image_path: Path) -> str | None:
        key = self.key_for(image_path)
        if key is None:
            return None
        self._used.add(key)
        return self.entries[key]

    def unused(self) -> list[str]:
        """Keys that matched no image so far: likely typos, worth a warning at the batch's end."""
        return [key for key in self.entries if key not in self._used]


@dataclass(frozen=True)
class ImagePrompt:
    """One image's high-level information and where it came from.

    source: "sidecar", "prompt-file", "blip", "classify" or "none". text: the per-image text,
    the raw caption, or the confident class label (None for "none" and for an unconfident
    class). description: the describer's full answer (blip and classify only). cached: the
    description came from the cache.
    """

    source: str
    text: str | None = None
    description: Description | None = None
    cached: bool = False

    def pipeline_args(self) -> dict:
        """Keyword arguments for `PASDPipeline.upscale` (and `build_prompt`)."""
        if self.source == "blip":
            return {"caption": self.text}
        if self.source in ("sidecar", "prompt-file", "classify"):
            return {"label": self.text}
        return {}

    def build(self, user_prompt: str, added_prompt: str, separator: str = CAPTION_SEPARATOR) -> str:
        from ..engine.prompts import build_prompt

        return build_prompt(user_prompt, added_prompt, separator=separator, **self.pipeline_args())

    def to_json(self) -> dict:
        record = self.provenance()
        if self.description is not None:
            record["caption_cached"] = self.cached
        return record

    def provenance(self) -> dict:
        """For the output's metadata: where the prompt came from, but not whether this run found
        it in the cache, so the same input and settings give the same bytes."""
        record: dict[str, Any] = {"prompt_source": self.source, "prompt_text": self.text}
        if self.description is not None:
            record["description"] = self.description.to_json()
        return record


@dataclass
class PromptStats:
    sidecar: int = 0
    prompt_file: int = 0
    described: int = 0
    cache_hits: int = 0
    none: int = 0

    def to_json(self) -> dict:
        return {
            "sidecar": self.sidecar,
            "prompt_file": self.prompt_file,
            "captions_computed": self.described,
            "caption_cache_hits": self.cache_hits,
            "none": self.none,
        }


def describer_missing(mode: str, model: str, reason: str, fetch: str = "pasd download") -> ModelError:
    """The error (exit 3) when the describer's weights are not on this machine and cannot be
    fetched (offline, or never downloaded): it names the two ways forward. `fetch` is the
    command that fetches them."""
    what = "captioner" if mode == "blip" else "classifier"
    return ModelError(
        f"the {what} for --caption {mode} ({model}) is not available: {reason}",
        hint=f"run `{fetch}` to fetch it, or pass --caption none to go without prompts from the image",
    )


class DescriberSource(Protocol):
    """What the resolver needs of a describer (the engine's `DescriberSpec` is one): its kind, its
    identity for the cache, and a way to load it."""

    kind: str

    def identity(self) -> dict[str, Any]: ...

    def load(self, device: Any, dtype: Any) -> Describer: ...


class PromptResolver:
    """Resolves each image's prompt source: sidecar > prompt file > describer > none.

    The describer is loaded on the device and dtype given, on the first image that needs it (so
    a batch answered entirely by sidecars, the prompt file or the cache never loads it), and
    stays loaded until `close()`.
    """

    def __init__(
        self,
        mode: str,
        describer: DescriberSource | None = None,
        *,
        device=None,
        dtype=None,
        prompt_file: PromptFile | None = None,
        cache: CaptionCache | None = None,
        use_sidecars: bool = True,
    ):
        if mode != "none" and (describer is None or describer.kind != mode):
            raise ValueError(f"caption mode {mode} needs a {mode} describer")
        if mode != "none" and (device is None or dtype is None):
            raise ValueError("a describer needs a device and a dtype")
        self.mode, self.describer = mode, describer
        self.device, self.dtype = device, dtype
        self.prompt_file, self.cache, self.use_sidecars = prompt_file, cache, use_sidecars
        self.stats = PromptStats()
        self._model: Describer | None = None
        self._identity: dict | None = None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def resolve(self, image_path: Path, read_image: Callable[[], Image.Image]) -> ImagePrompt:
        """`read_image` gives the ORIGINAL input image; it is called only when a description is
        needed. Raises InputError for an unusable sidecar or image (this image only)."""
        text = read_sidecar(image_path) if self.use_sidecars else None
        if text is not None:
            self.stats.sidecar += 1
            return ImagePrompt("sidecar", text)
        text = self.prompt_file.lookup(image_path) if self.prompt_file else None
        if text is not None:
            self.stats.prompt_file += 1
            return ImagePrompt("prompt-file", text)
        if self.mode == "none":
            self.stats.none += 1
            return ImagePrompt("none")
        description, cached = self._describe(read_image())
        text = description.caption if self.mode == "blip" else description.label
        return ImagePrompt(self.mode, text, description, cached)

    def _describe(self, image: Image.Image) -> tuple[Description, bool]:
        assert self.describer is not None  # a mode that describes has a describer
        if self._identity is None:
            self._identity = self.describer.identity()
        digest = image_digest(image) if self.cache is not None else None
        if self.cache is not None and digest is not None:
            description = self.cache.get(self._identity, digest)
            if description is not None:
                self.stats.cache_hits += 1
                return description, True
        if self._model is None:
            self._model = self.describer.load(self.device, self.dtype)
        description = self._model.describe(image)
        self.stats.described += 1
        if self.cache is not None and digest is not None:
            self.cache.put(self._identity, digest, description)
        return description, False

    def close(self) -> None:
        """Free the describer (before the diffusion, when memory is short)."""
        if self._model is not None:
            self._model.free()
            self._model = None

    def __enter__(self) -> PromptResolver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
