"""Caption augmentation, tokenising each caption once, and SDXL prompt encoding: penultimate hidden states of
both encoders concatenated, pooled embedding from the second."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CaptionAugmentation:
    dropout: float = 0.0  # probability of training on the empty caption
    shuffle: bool = False  # shuffle comma-separated tags after the first keep_tokens
    keep_tokens: int = 1

    def apply(self, caption: str, rng: random.Random) -> str:
        if self.dropout > 0 and rng.random() < self.dropout:
            return ""
        if self.shuffle:
            tags = [tag.strip() for tag in caption.split(",")]
            head, tail = tags[: self.keep_tokens], tags[self.keep_tokens :]
            rng.shuffle(tail)
            caption = ", ".join(tag for tag in head + tail if tag)
        return caption


class PromptTokenizer:
    """Tokenises each distinct caption once for both tokenizers and remembers the ids."""

    def __init__(self, tokenizers: list):
        self.tokenizers = tokenizers
        self._cache: dict[str, tuple[torch.Tensor, ...]] = {}

    def __call__(self, captions: list[str]) -> list[torch.Tensor]:
        per_caption = [self._ids(caption) for caption in captions]
        return [torch.stack([ids[k] for ids in per_caption]) for k in range(len(self.tokenizers))]

    def _ids(self, caption: str) -> tuple[torch.Tensor, ...]:
        if caption not in self._cache:
            self._cache[caption] = tuple(
                tok(caption, padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt").input_ids[0]
                for tok in self.tokenizers
            )
        return self._cache[caption]


def encode_prompt(text_encoders: list[torch.nn.Module],
                  input_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL prompt encoding: ``([B, 77, d1 + d2], [B, d2])``."""
    hidden = []
    pooled = None
    for encoder, ids in zip(text_encoders, input_ids):
        output = encoder(ids.to(encoder.device), output_hidden_states=True)
        hidden.append(output.hidden_states[-2])
        pooled = output[0]  # the projected pooled embedding of the last (second) encoder
    return torch.cat(hidden, dim=-1), pooled
