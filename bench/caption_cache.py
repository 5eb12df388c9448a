"""Benchmark: the text-encoder output cache after the pivot, with caption shuffling, on a 200-image captioned set.

    .venv/bin/python bench/caption_cache.py [--images 200] [--tags 8] [--steps 1000] [--batch 4] [--ti-frac 0.5]

Replays the trainer's caption draws (CaptionAugmentation with shuffle, keep_tokens=1, one random.Random per sample
as SampleKey gives) for the steps after the pivot, and feeds every caption to a TextCache whose entries have the
real SDXL shapes in 16-bit ([77, 768+1280] hidden states, [1280] pooled) as meta tensors: the byte counts are the
ones the training device would hold, without allocating them. Prints the unbounded size and, for the default budget,
the held size, evictions and hit rate.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pti.dataset.text import CaptionAugmentation  # noqa: E402
from pti.training.text_cache import DEFAULT_TEXT_CACHE_BYTES, TextCache  # noqa: E402

SDXL_TOKENS, SDXL_HIDDEN, SDXL_POOLED = 77, 768 + 1280, 1280
MiB = 1024**2


def captions(images: int, tags: int) -> list[str]:
    rng = random.Random(0)
    vocabulary = [f"tag{i}" for i in range(200)]
    return ["<s0><s1>, " + ", ".join(rng.sample(vocabulary, tags)) for _ in range(images)]


def replay(budget: int | None, texts: list[str], steps: int, batch: int, pivot: int) -> tuple[TextCache, int, int]:
    cache = TextCache(budget)
    augmentation = CaptionAugmentation(shuffle=True, keep_tokens=1)
    for caption in sorted(set(texts)):  # the pivot encodes the unshuffled captions
        cache.put(caption, *entry())
    hits = draws = 0
    for step in range(pivot, steps):
        for slot in range(batch):
            rng = random.Random(hash((0, step, slot)))
            caption = augmentation.apply(texts[rng.randrange(len(texts))], rng)
            draws += 1
            if caption in cache:
                hits += 1
                cache.get(caption)
            else:
                cache.put(caption, *entry())
    return cache, hits, draws


def entry() -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(SDXL_TOKENS, SDXL_HIDDEN, dtype=torch.bfloat16, device="meta"),
            torch.empty(SDXL_POOLED, dtype=torch.bfloat16, device="meta"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--tags", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--ti-frac", type=float, default=0.5)
    args = parser.parse_args()
    texts = captions(args.images, args.tags)
    pivot = int(args.ti_frac * args.steps)
    print(f"{args.images} captions of {args.tags} shuffled tags, steps {pivot}..{args.steps} after the pivot, "
          f"batch {args.batch}; one SDXL entry = {sum(t.numel() * t.element_size() for t in entry()) / 1024:.1f} KiB")
    print("| budget | entries held | MiB held | evicted | hit rate |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for budget in (None, DEFAULT_TEXT_CACHE_BYTES):
        cache, hits, draws = replay(budget, texts, args.steps, args.batch, pivot)
        label = "unbounded (before)" if budget is None else f"{budget // MiB} MiB (default)"
        print(f"| {label} | {len(cache)} | {cache.bytes / MiB:.0f} | {cache.evicted} | {hits / draws:.1%} |")


if __name__ == "__main__":
    main()
