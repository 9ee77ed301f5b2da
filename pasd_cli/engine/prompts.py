"""Prompt strings (spec section 5) and their CLIP embeddings (spec section 4, step 3)."""

from __future__ import annotations

import torch

from .settings import CAPTION_SEPARATOR

_CAPTION_CLEANUP = (("blurry", "clear"), ("noisy", "clean"))


def clean_caption(caption: str) -> str:
    """The released cleanup: a caption of a degraded image should not ask for degradation."""
    for old, new in _CAPTION_CLEANUP:
        caption = caption.replace(old, new)
    return caption


def build_prompt(
    user_prompt: str,
    added_prompt: str,
    caption: str | None = None,
    label: str | None = None,
    separator: str = CAPTION_SEPARATOR,
) -> str:
    """The released rules, with `separator` between a caption and the added prompt (released:
    none, so "a dog" became "a dogclean, high-resolution, 8k"; `UpscaleSettings.caption_separator`).

    caption: "<caption>[ <user prompt>]"; label (a confident class): "[<user prompt>, ]<label>, ";
    neither: "" or "<user prompt>, ". An empty caption or label counts as none.
    """
    caption = caption.strip() if caption else ""
    label = label.strip() if label else ""
    if caption:
        prompt = clean_caption(caption)
        if user_prompt:
            prompt = f"{prompt} {user_prompt}"
        if added_prompt:
            prompt += separator
    elif label:
        prompt = f"{user_prompt}, {label}, " if user_prompt else f"{label}, "
    else:
        prompt = f"{user_prompt}, " if user_prompt else ""
    return prompt + added_prompt


@torch.inference_mode()
def encode_texts(tokenizer, text_encoder, texts: list[str]) -> torch.Tensor:
    """CLIP last hidden states, (len(texts), 77, C): padded to the model length, truncated."""
    tokens = tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    ids = tokens.input_ids.to(text_encoder.device)
    return text_encoder(ids)[0]


def prompt_embeddings(tokenizer, text_encoder, prompt: str, negative_prompt: str, cfg: bool) -> torch.Tensor:
    """[negative; positive] with guidance (the order CFG splits them in), else [positive]."""
    texts = [negative_prompt, prompt] if cfg else [prompt]
    return encode_texts(tokenizer, text_encoder, texts)
