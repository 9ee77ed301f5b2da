"""High-level information about an image for its prompt (spec section 5): a BLIP caption, or an
ImageNet class from a ResNet-50, both from transformers.

Each model loads from a local folder (safetensors only) onto the device and dtype the caller
chose, describes one original (not upscaled) image at a time, and can be freed before the
diffusion. Image preprocessing uses transformers' PIL backend: torchvision is not a dependency.
"""

from __future__ import annotations

import gc
import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

from ..errors import ModelError
from .memory import free_device_cache
from .pretrained import from_pretrained
from .settings import CaptionSettings

DESCRIBER_KINDS = ("blip", "classify")
# How an ImageNet class name becomes prompt text; part of the classifier's identity, so a change
# here invalidates cached labels.
LABEL_RULE = "first-synonym"


@dataclass(frozen=True)
class Description:
    """What a describer says about one image. `label` is set only when the top class passes the
    probability threshold; `top_class` and `probability` are kept for review either way."""

    caption: str | None = None
    label: str | None = None
    top_class: str | None = None
    probability: float | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Description:
        """Raises ValueError on anything but the four fields with their types."""
        if not isinstance(data, dict) or set(data) != {"caption", "label", "top_class", "probability"}:
            raise ValueError("not a description")
        for key in ("caption", "label", "top_class"):
            if data[key] is not None and not isinstance(data[key], str):
                raise ValueError(f"{key} is not a string")
        probability = data["probability"]
        if probability is not None and (isinstance(probability, bool) or not isinstance(probability, (int, float))):
            raise ValueError("probability is not a number")
        return cls(**data)


class Describer(Protocol):
    def describe(self, image: Image.Image) -> Description: ...

    def free(self) -> None: ...


def imagenet_label(class_name: str) -> str:
    """ImageNet class names list synonyms ("tabby, tabby cat"); the released code prints
    torchvision's category name, which is the first of them, so we keep the first."""
    return class_name.split(",")[0].strip()


def top_class(probabilities: torch.Tensor, id2label: dict, min_probability: float) -> Description:
    """The released rule: top-1 class (the first on ties, as argmax), a label only if p >= min."""
    index = int(probabilities.argmax())
    probability = float(probabilities[index])
    name = imagenet_label(id2label[index])
    return Description(label=name if probability >= min_probability else None, top_class=name, probability=probability)


def folder_fingerprint(folder: Path) -> str:
    """Stands in for a revision when the caller has none: names, sizes and modification times of
    the folder's files. Rewriting a file changes it (a cache miss, never a stale hit); hashing a
    1 GB weights file on every run would cost seconds."""
    if not folder.is_dir():
        raise ModelError(f"model folder not found: {folder}")
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return "local-" + digest.hexdigest()[:16]


@dataclass(frozen=True)
class DescriberSpec:
    """Which describer, where its files are, and how it runs: enough to name its output in a
    cache without loading it. `name` is the hub repo id (or the user's name for a local folder);
    `revision` the hub commit the files came from, when known."""

    kind: str
    folder: Path
    name: str
    revision: str | None = None
    settings: CaptionSettings = field(default_factory=CaptionSettings)

    def __post_init__(self):
        if self.kind not in DESCRIBER_KINDS:
            raise ValueError(f"describer kind must be one of {', '.join(DESCRIBER_KINDS)}")

    def identity(self) -> dict:
        """Everything that decides the output for a given image; device and dtype are left out
        on purpose, so a caption made on a GPU serves a later CPU run of the same model."""
        revision = self.revision or folder_fingerprint(Path(self.folder))
        identity = {"kind": self.kind, "model": self.name, "revision": revision}
        s = self.settings
        if self.kind == "blip":
            identity.update(
                prefix=s.blip_prefix, num_beams=s.num_beams, min_length=s.min_length, max_length=s.max_length
            )
        else:
            identity.update(min_probability=s.min_probability, label_rule=LABEL_RULE)
        return identity

    def load(self, device: torch.device, dtype: torch.dtype) -> Describer:
        loader = BlipCaptioner if self.kind == "blip" else ImageNetClassifier
        return loader.from_folder(Path(self.folder), self.settings, torch.device(device), dtype)


def _require_folder(folder: Path, what: str) -> None:
    if not folder.is_dir():
        raise ModelError(f"{what} folder not found: {folder}")


def _pil_image_processor(folder: Path):
    from transformers import AutoImageProcessor

    # The PIL backend: the default torchvision one is not installed, and must not be.
    return from_pretrained(AutoImageProcessor, folder, backend="pil")


class _HubModel:
    def __init__(self, model, image_processor, settings: CaptionSettings, device: torch.device, dtype: torch.dtype):
        self.model = model.eval().requires_grad_(False).to(device, dtype)
        self.image_processor = image_processor
        self.settings = settings
        self.device, self.dtype = device, dtype

    def _pixels(self, image: Image.Image) -> torch.Tensor:
        if self.model is None:
            raise RuntimeError("describer used after free()")
        pixels = self.image_processor(images=image.convert("RGB"), return_tensors="pt").pixel_values
        return pixels.to(self.device, self.dtype)

    def free(self) -> None:
        """Drop the weights so the diffusion gets the memory back."""
        self.model = None
        gc.collect()
        free_device_cache(self.device)


class BlipCaptioner(_HubModel):
    """BLIP image captioning (`BlipForConditionalGeneration`), generating as the released BLIP
    path does: decoder primed with the prefix, beam search, bounded length, no sampling."""

    def __init__(self, model, image_processor, tokenizer, settings, device, dtype):
        super().__init__(model, image_processor, settings, device, dtype)
        self.tokenizer = tokenizer

    @classmethod
    def from_folder(
        cls, folder: Path, settings: CaptionSettings, device: torch.device, dtype: torch.dtype
    ) -> BlipCaptioner:
        from transformers import AutoTokenizer, BlipForConditionalGeneration

        _require_folder(folder, "captioner")
        model = from_pretrained(BlipForConditionalGeneration, folder, use_safetensors=True)
        return cls(model, _pil_image_processor(folder), from_pretrained(AutoTokenizer, folder), settings, device, dtype)

    def describe(self, image: Image.Image) -> Description:
        s = self.settings
        with torch.inference_mode():
            pixels = self._pixels(image)
            prefix = self.tokenizer(s.blip_prefix, return_tensors="pt").input_ids.to(self.device)
            # Every generation option is pinned, so a folder's generation_config.json cannot
            # change captions behind the cache's back.
            ids = self.model.generate(
                pixel_values=pixels,
                input_ids=prefix,
                do_sample=False,
                num_beams=s.num_beams,
                min_length=s.min_length,
                max_length=s.max_length,
                repetition_penalty=1.0,
                length_penalty=1.0,
                no_repeat_ngram_size=0,
            )
        # generate() swaps the leading [CLS] for BOS and drops the closing [SEP], so the output
        # starts with len(prefix) - 1 prompt tokens; the caption is what follows them.
        generated = ids[0, prefix.shape[1] - 1 :]
        return Description(caption=self.tokenizer.decode(generated, skip_special_tokens=True).strip())


class ImageNetClassifier(_HubModel):
    """ImageNet classification (`ResNetForImageClassification`, e.g. microsoft/resnet-50)."""

    @classmethod
    def from_folder(
        cls, folder: Path, settings: CaptionSettings, device: torch.device, dtype: torch.dtype
    ) -> ImageNetClassifier:
        from transformers import ResNetForImageClassification

        _require_folder(folder, "classifier")
        model = from_pretrained(ResNetForImageClassification, folder, use_safetensors=True)
        return cls(model, _pil_image_processor(folder), settings, device, dtype)

    def describe(self, image: Image.Image) -> Description:
        with torch.inference_mode():
            logits = self.model(pixel_values=self._pixels(image)).logits[0]
        return top_class(logits.float().softmax(-1), self.model.config.id2label, self.settings.min_probability)
