"""Measure what a pipeline draws: generate images for captions and score them with the evaluator."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from pti.toyworld.evaluator import HEADS, Evaluator, read
from pti.toyworld.world import HELD_OUT_SHAPES, KNOWN_SHAPES, Scene, caption, name_caption, scenes


@dataclass(frozen=True)
class SamplingSettings:
    steps: int = 25
    guidance: float = 3.0
    batch_size: int = 32


@dataclass(frozen=True)
class Score:
    accuracy: dict[str, float]
    shapes_read: dict[str, int]
    count: int


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], seed: int, steps: int = 25, guidance: float = 6.0,
             batch_size: int = 32, negative_prompt: str | None = None) -> list[Image.Image]:
    """One 64x64 image per prompt; batch ``k`` draws its noise from ``seed + k``. ``negative_prompt=None`` gives the
    unconditional branch all-zero embeddings (diffusers' default for SDXL); ``""`` encodes the empty prompt (what
    A1111 and ComfyUI do)."""
    images: list[Image.Image] = []
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    for k, start in enumerate(range(0, len(prompts), batch_size)):
        generator = torch.Generator().manual_seed(seed + k)
        batch = list(prompts[start:start + batch_size])
        negative = None if negative_prompt is None else [negative_prompt] * len(batch)
        images += pipe(prompt=batch, negative_prompt=negative, num_inference_steps=steps,
                       guidance_scale=guidance, height=size, width=size, generator=generator,
                       output_type="pil").images
    return images


def score(evaluator: Evaluator, images: Sequence[Image.Image], expected: Sequence[Scene]) -> Score:
    """Per-head fraction of images the evaluator reads as expected, and which shapes it read."""
    readings = read(evaluator, images)
    accuracy = {name: sum(getattr(r, name) == getattr(e, name) for r, e in zip(readings, expected)) / len(expected)
                for name in HEADS}
    return Score(accuracy=accuracy, shapes_read=dict(Counter(r.shape for r in readings)), count=len(expected))


def probe_scenes(seed: int, count: int, shapes: Sequence[str]) -> list[Scene]:
    """Scenes to prompt for, from a seed range the pretraining never used."""
    return list(scenes(seed + 2_000_000, count, shapes=shapes))


def measure(pipe, evaluator: Evaluator, count: int = 96, held_out_count: int = 32, seed: int = 0,
            settings: SamplingSettings = SamplingSettings()) -> dict[str, Score]:
    """Known shapes drawn from their captions (with the unconditional branch as zeros, and as the encoded empty
    prompt), from the shape's name alone ("a photo of square": the form of the subject-fidelity prompt "a photo of
    TOK", which no pretraining caption has), and what the model draws when asked for a held-out shape."""
    results = {}
    runs = (("known", KNOWN_SHAPES, count, None, caption), ("known_empty_negative", KNOWN_SHAPES, count, "", caption),
            ("known_name_only", KNOWN_SHAPES, count, None, lambda scene: name_caption(scene.shape)),
            ("held_out", HELD_OUT_SHAPES, held_out_count, None, caption))
    for name, shapes, n, negative, prompt in runs:
        expected = probe_scenes(seed, n, shapes)
        images = generate(pipe, [prompt(s) for s in expected], seed, settings.steps, settings.guidance,
                          settings.batch_size, negative)
        results[name] = score(evaluator, images, expected)
    return results


def contact_sheet(images: Sequence[Image.Image], columns: int = 8) -> Image.Image:
    rows = (len(images) + columns - 1) // columns
    w, h = images[0].size
    sheet = Image.new("RGB", (columns * w, rows * h))
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * w, (i // columns) * h))
    return sheet

