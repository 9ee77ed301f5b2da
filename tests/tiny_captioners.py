"""Tiny random BLIP and ResNet models built at test time, saved as the hub folders are laid out
(safetensors weights, hub-style preprocessor_config.json, a generated WordPiece vocabulary)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

WORDS = (
    "a picture of photo dog cat man woman bird car tree house red blue green old small "
    "sitting standing on in with the and grass street field water blurry noisy clear "
    "clean black white dark night"
).split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

IMAGENET_NAMES = ["tench, Tinca tinca", "tabby, tabby cat", "golden retriever"] + [
    f"class {i}, synonym {i}" for i in range(3, 20)
]


def build_tiny_blip(folder: Path, seed: int = 0) -> Path:
    from transformers import AutoTokenizer, BlipConfig, BlipForConditionalGeneration

    folder.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL + WORDS + [f"##{w}" for w in ("s", "ing", "ed")]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512})
    )
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)
    # transformers 5 no longer writes it, but the hub repo has it (and the manifest lists it).
    (folder / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "cls_token": "[CLS]",
                "mask_token": "[MASK]",
                "pad_token": "[PAD]",
                "sep_token": "[SEP]",
                "unk_token": "[UNK]",
            }
        )
    )
    # As the hub model: BOS ([DEC]) and one spare id lie past the tokenizer's vocabulary.
    size = len(vocab)
    config = BlipConfig(
        text_config=dict(
            vocab_size=size + 2,
            hidden_size=32,
            encoder_hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            bos_token_id=size,
            pad_token_id=0,
            sep_token_id=vocab.index("[SEP]"),
            eos_token_id=vocab.index("[SEP]"),
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            initializer_range=0.02,
        ),
        projection_dim=16,
        image_text_hidden_size=16,
    )
    model = BlipForConditionalGeneration(config)
    # BLIP's own initialisation leaves the image's influence on a model this small negligible
    # (every image would get one caption); matrices ~ N(0, 1/fan_in) make captions differ.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            if parameter.dim() >= 2:
                fan_in = parameter[0].numel()
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / math.sqrt(fan_in))
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "do_normalize": True,
                "do_resize": True,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_processor_type": "BlipImageProcessor",
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "processor_class": "BlipProcessor",
                "size": 32,
            }
        )
    )
    return folder


def build_tiny_resnet(folder: Path, probabilities: list[float] | None = None, seed: int = 0) -> Path:
    """With `probabilities`, the head's weights are zero and its bias their logarithm, so the
    classifier answers exactly these probabilities for every image."""
    from transformers import ResNetConfig, ResNetForImageClassification

    folder.mkdir(parents=True, exist_ok=True)
    config = ResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="bottleneck",
        num_labels=len(IMAGENET_NAMES),
        id2label=dict(enumerate(IMAGENET_NAMES)),
        label2id={name: i for i, name in enumerate(IMAGENET_NAMES)},
    )
    torch.manual_seed(seed)
    model = ResNetForImageClassification(config)
    if probabilities is not None:
        head = model.classifier[-1]
        with torch.no_grad():
            head.weight.zero_()
            head.bias.copy_(torch.tensor([math.log(p) for p in probabilities]))
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "crop_pct": 0.875,
                "do_normalize": True,
                "do_resize": True,
                "feature_extractor_type": "ConvNextFeatureExtractor",
                "image_mean": [0.485, 0.456, 0.406],
                "image_std": [0.229, 0.224, 0.225],
                "resample": 3,
                "size": 224,
            }
        )
    )
    return folder


def confident(index: int, p: float = 0.5) -> list[float]:
    rest = (1 - p) / (len(IMAGENET_NAMES) - 1)
    return [p if i == index else rest for i in range(len(IMAGENET_NAMES))]


def uniform() -> list[float]:
    return [1 / len(IMAGENET_NAMES)] * len(IMAGENET_NAMES)


def one_torch_thread():
    """Generator for an autouse fixture: a tiny model's ops take microseconds, so a second thread
    only adds synchronisation, which costs milliseconds per op on a busy shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
