"""The text encoders' outputs per caption after the pivot, on the training device, bounded in bytes.

Without caption shuffling the captions are a fixed set, encoded once at the pivot, and every one stays (the encoders
leave the device). With shuffling every step may bring new tag orders: they are added as seen and the least recently
used are dropped once the cache holds more than ``max_bytes`` (the encoders stay on the device for them).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

DEFAULT_TEXT_CACHE_BYTES = 256 * 1024**2  # ~840 SDXL captions in 16-bit: 77x2048 hidden states + 1280 pooled


def entry_bytes(embeds: torch.Tensor, pooled: torch.Tensor) -> int:
    return embeds.numel() * embeds.element_size() + pooled.numel() * pooled.element_size()


class TextCache:
    """Caption → (prompt_embeds [77, d], pooled [d2]); least recently used first out past ``max_bytes`` (None:
    unbounded)."""

    def __init__(self, max_bytes: int | None) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.bytes = 0
        self.evicted = 0

    def __contains__(self, caption: str) -> bool:
        return caption in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)

    def __getitem__(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        """An entry without counting it as used."""
        return self.entries[caption]

    def get(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        self.entries.move_to_end(caption)
        return self.entries[caption]

    def put(self, caption: str, embeds: torch.Tensor, pooled: torch.Tensor) -> None:
        if caption in self.entries:
            self.bytes -= entry_bytes(*self.entries.pop(caption))
        self.entries[caption] = (embeds, pooled)
        self.bytes += entry_bytes(embeds, pooled)
        while self.max_bytes is not None and self.bytes > self.max_bytes and len(self.entries) > 1:
            _, dropped = self.entries.popitem(last=False)
            self.bytes -= entry_bytes(*dropped)
            self.evicted += 1
