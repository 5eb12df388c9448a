"""Procedural 64x64 images of one coloured shape on a plain background, with captions, deterministic from a seed."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterator, Sequence

from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "hexagon", "cross", "star", "heart")
HELD_OUT_SHAPES: tuple[str, ...] = ("star", "heart")
KNOWN_SHAPES: tuple[str, ...] = tuple(s for s in SHAPES if s not in HELD_OUT_SHAPES)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 140, 25),
    "yellow": (245, 220, 40),
    "green": (40, 165, 60),
    "blue": (35, 75, 215),
    "purple": (135, 50, 175),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "pink": (245, 175, 205),
    "beige": (225, 205, 160),
    "teal": (20, 128, 128),
    "brown": (105, 65, 35),
    "sky": (140, 190, 235),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
BACKGROUND_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)

SIZE_WORDS: tuple[str, ...] = ("small", "large")
POSITION_WORDS: tuple[str, ...] = ("top", "bottom", "left", "right", "centre")
CAPTION_WORDS: tuple[str, ...] = ("a", "photo", "of", "on", "background", "at", "the")
VOCABULARY: tuple[str, ...] = CAPTION_WORDS + SHAPES + COLOUR_NAMES + BACKGROUND_NAMES + SIZE_WORDS + POSITION_WORDS

MIN_CONTRAST = 90.0
RADIUS_RANGE = (0.22, 0.32)
CENTRE_JITTER = 0.12


def contrast(colour: str, background: str) -> float:
    """Euclidean RGB distance between an object colour and a background."""
    return math.dist(COLOURS[colour], BACKGROUNDS[background])


def compatible(colour: str, background: str) -> bool:
    """Whether the object stays clearly visible on the background (never the same colour on the same colour)."""
    return contrast(colour, background) >= MIN_CONTRAST


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    x: float = 0.5
    y: float = 0.5
    radius: float = 0.27


def _regular_polygon(sides: int, start_angle: float, scale_y: float = 1.0) -> list[tuple[float, float]]:
    return [(math.cos(start_angle + 2 * math.pi * k / sides), scale_y * math.sin(start_angle + 2 * math.pi * k / sides))
            for k in range(sides)]


def _star() -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        r = 1.0 if k % 2 == 0 else 0.42
        angle = -math.pi / 2 + math.pi * k / 5
        points.append((r * math.cos(angle), r * math.sin(angle) + 0.08))
    return points


def _cross(arm: float = 0.34) -> list[tuple[float, float]]:
    a, b = arm, 0.95
    return [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]


def _heart(samples: int = 64) -> list[tuple[float, float]]:
    points = []
    for k in range(samples):
        t = 2 * math.pi * k / samples
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        points.append((x / 17.0, -y / 17.0 + 0.1))
    return points


OUTLINES: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)],
    "triangle": [(0.0, -1.0), (1.0, 0.78), (-1.0, 0.78)],
    "diamond": [(0.0, -1.0), (0.72, 0.0), (0.0, 1.0), (-0.72, 0.0)],
    "hexagon": _regular_polygon(6, 0.0),
    "cross": _cross(),
    "star": _star(),
    "heart": _heart(),
}


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """The scene as an RGB image, drawn at ``SUPERSAMPLE``x and box-downsampled for anti-aliased edges."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    cx, cy, r = scene.x * big, scene.y * big, scene.radius * big
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon([(cx + r * px, cy + r * py) for px, py in OUTLINES[scene.shape]], fill=fill)
    return image.resize((size, size), Image.Resampling.BOX)


def _position_word(x: float, y: float) -> str:
    vertical = "top " if y < 0.45 else "bottom " if y > 0.55 else ""
    horizontal = "left" if x < 0.45 else "right" if x > 0.55 else ""
    return (vertical + horizontal).strip() or "centre"


def caption(scene: Scene, layout: bool = False, shape_word: str | None = None, colour: bool = True) -> str:
    """``"a photo of a red square on a grey background"``; with ``layout`` also size and position words.
    ``shape_word`` replaces the shape's name (e.g. by a trigger token); ``colour=False`` leaves the colour out (one of
    the pretraining captions' partial forms)."""
    noun = shape_word if shape_word is not None else scene.shape
    if not colour and layout:
        raise ValueError("a caption without its colour has no layout form")
    if not colour:
        return f"a photo of a {noun} on a {scene.background} background"
    if not layout:
        return f"a photo of a {scene.colour} {noun} on a {scene.background} background"
    size_word = "small" if scene.radius < sum(RADIUS_RANGE) / 2 else "large"
    return (f"a photo of a {size_word} {scene.colour} {noun} at the {_position_word(scene.x, scene.y)} "
            f"on a {scene.background} background")


def name_caption(noun: str, article: bool = False) -> str:
    """``"a photo of square"`` (``article``: ``"a photo of a square"``): the noun alone, the form of the
    subject-fidelity prompt ``"a photo of TOK"``."""
    return f"a photo of {'a ' if article else ''}{noun}"


def sample_scene(rng: random.Random, shapes: Sequence[str] = KNOWN_SHAPES, colours: Sequence[str] = COLOUR_NAMES,
                 backgrounds: Sequence[str] = BACKGROUND_NAMES) -> Scene:
    """A random scene over the given words; colour/background pairs that are not ``compatible`` are never drawn."""
    shape = rng.choice(list(shapes))
    pairs = [(c, b) for c in colours for b in backgrounds if compatible(c, b)]
    if not pairs:
        raise ValueError(f"no colour among {list(colours)} is visible on any background among {list(backgrounds)}")
    colour, background = rng.choice(pairs)
    radius = rng.uniform(*RADIUS_RANGE)
    x = 0.5 + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER)
    y = 0.5 + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER)
    return Scene(shape=shape, colour=colour, background=background, x=x, y=y, radius=radius)


def scenes(seed: int, count: int, shapes: Sequence[str] = KNOWN_SHAPES, colours: Sequence[str] = COLOUR_NAMES,
           backgrounds: Sequence[str] = BACKGROUND_NAMES) -> Iterator[Scene]:
    """``count`` scenes from one seeded stream."""
    rng = random.Random(seed)
    for _ in range(count):
        yield sample_scene(rng, shapes, colours, backgrounds)
