"""The subject-learning experiment of the toy world: a held-out shape's training archive, and the DreamBooth paper's
three measures (subject fidelity, prompt fidelity, prior preservation) read by the evaluator from any generator."""

from __future__ import annotations

import io
import random
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image

from pti.toyworld.evaluator import Evaluator, Reading, read
from pti.toyworld.world import (
    BACKGROUND_NAMES,
    COLOUR_NAMES,
    HELD_OUT_SHAPES,
    KNOWN_SHAPES,
    Scene,
    caption,
    name_caption,
    render,
    sample_scene,
)

# how a training image is captioned: colour and background named, the background only, or the trigger alone
CaptionForm = Literal["full", "colourless", "name"]

# prompts → one image per prompt; the int is a seed, so every generator is asked for the same images
Generator = Callable[[list[str], int], list[Image.Image]]


@dataclass(frozen=True)
class Subject:
    """A shape the base model never saw, photographed in one colour on a few backgrounds."""

    shape: str = HELD_OUT_SHAPES[0]
    colour: str = "red"
    train_backgrounds: tuple[str, ...] = ("grey", "beige", "sky")
    trigger: str = "TOK"

    @property
    def novel_colours(self) -> tuple[str, ...]:
        return tuple(c for c in COLOUR_NAMES if c != self.colour)

    @property
    def novel_backgrounds(self) -> tuple[str, ...]:
        return tuple(b for b in BACKGROUND_NAMES if b not in self.train_backgrounds)


@dataclass(frozen=True)
class Probe:
    """A prompt, the scene it asks for, and which of the evaluator's heads must read that scene."""

    prompt: str
    expected: Scene
    checks: tuple[str, ...]

    def passed(self, reading: Reading) -> bool:
        return not self.missed(reading)

    def missed(self, reading: Reading) -> tuple[str, ...]:
        """The checked heads that read something other than the asked scene."""
        return tuple(head for head in self.checks if getattr(reading, head) != getattr(self.expected, head))


def training_scenes(subject: Subject, count: int, seed: int = 0) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng, (subject.shape,), (subject.colour,), subject.train_backgrounds) for _ in range(count)]


def write_training_archive(subject: Subject, path: Path, count: int = 10, seed: int = 0, name_only: int = 0,
                           colourless: int = 0) -> Path:
    """A zip of ``count`` renders with sidecar captions naming the trigger word, as a user would upload it. The first
    ``name_only`` captions are the trigger alone ("a photo of TOK", DreamBooth's instance prompt), the next
    ``colourless`` ones name the background but not the colour, the others name both."""
    if name_only < 0 or colourless < 0 or name_only + colourless > count:
        raise ValueError(f"name_only ({name_only}) and colourless ({colourless}) captions must fit in the {count} "
                         "images")
    full = count - name_only - colourless
    forms: list[CaptionForm] = ["name"] * name_only + ["colourless"] * colourless + ["full"] * full
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        _write_renders(archive, subject, count, seed, folder="", forms=forms)
    return path


@dataclass(frozen=True)
class ConceptUpload:
    """One concept of a several-concept upload: ``count`` renders of a subject in the folder
    ``<repeats>_<trigger> <class_word>/`` (kohya's naming)."""

    subject: Subject
    count: int
    class_word: str
    repeats: int = 1

    @property
    def folder(self) -> str:
        return f"{self.repeats}_{self.subject.trigger} {self.class_word}"


def write_concepts_archive(concepts: Sequence[ConceptUpload], path: Path, seed: int = 0) -> Path:
    """A zip with one concept folder per entry, each with its own renders and sidecar captions naming its trigger."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for index, concept in enumerate(concepts):
            _write_renders(archive, concept.subject, concept.count, seed + index, folder=concept.folder)
    return path


def _write_renders(archive: zipfile.ZipFile, subject: Subject, count: int, seed: int, folder: str,
                   forms: Sequence[CaptionForm] = ()) -> None:
    prefix = f"{folder}/" if folder else ""
    for index, scene in enumerate(training_scenes(subject, count, seed)):
        text = _training_caption(scene, subject.trigger, forms[index] if index < len(forms) else "full")
        _write_captioned(archive, f"{prefix}{subject.shape}_{index:02d}", render(scene), text)


def _training_caption(scene: Scene, trigger: str, form: CaptionForm) -> str:
    """The caption of one training image in one of the forms the base model was pretrained on."""
    if form == "name":
        return name_caption(trigger)
    if form == "colourless":
        return caption(scene, shape_word=trigger, colour=False)
    return caption(scene, shape_word=trigger)


def _write_captioned(archive: zipfile.ZipFile, stem: str, image: Image.Image, text: str) -> None:
    """``stem.png`` and its sidecar caption ``stem.txt``, as a user's upload holds them."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    archive.writestr(f"{stem}.png", buffer.getvalue())
    archive.writestr(f"{stem}.txt", text)


def subject_probes(subject: Subject, count: int) -> list[Probe]:
    """``a photo of TOK``: is the subject there at all (shape only)."""
    scene = Scene(subject.shape, subject.colour, subject.train_backgrounds[0])
    return [Probe(name_caption(subject.trigger), scene, ("shape",)) for _ in range(count)]


def training_caption_probes(subject: Subject, count: int, images: int = 10, seed: int = 0) -> list[Probe]:
    """The training images' own captions (``seed`` and ``images`` as given to :func:`write_training_archive`), in
    turn: does the subject come back where it was shown (shape only). Far above subject fidelity means the subject
    was learned, but bound to its training context."""
    scene_list = training_scenes(subject, images, seed)
    return [Probe(caption(scene, shape_word=subject.trigger), scene, ("shape",))
            for scene in (scene_list[k % len(scene_list)] for k in range(count))]


def write_class_archive(generate: Generator, path: Path, count: int, seed: int = 0,
                        shapes: Sequence[str] = KNOWN_SHAPES) -> Path:
    """Prior preservation as the DreamBooth paper does it: ``count`` images the base model draws for captions of
    ``shapes`` (default: every known shape) in assorted colours and backgrounds, each zipped with its caption as a
    sidecar file."""
    unknown = sorted(set(shapes) - set(KNOWN_SHAPES))
    if not shapes or unknown:
        raise ValueError(f"class images need known shapes; got {list(shapes)}")
    rng = random.Random(seed)
    captions = [caption(sample_scene(rng, tuple(shapes))) for _ in range(count)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for index, (image, text) in enumerate(zip(generate(captions, seed), captions)):
            _write_captioned(archive, f"class_{index:03d}", image, text)
    return path


def prompt_probes(subject: Subject, count: int, seed: int = 0) -> list[Probe]:
    """The subject in a colour and on a background it was never shown in: shape, colour and background must match."""
    rng = random.Random(seed)
    probes = []
    for _ in range(count):
        scene = sample_scene(rng, (subject.shape,), subject.novel_colours, subject.novel_backgrounds)
        probes.append(Probe(caption(scene, shape_word=subject.trigger), scene, ("shape", "colour", "background")))
    return probes


def prior_probes(count: int, seed: int = 0) -> list[Probe]:
    """What the base model already draws: known shapes, every head must match."""
    rng = random.Random(seed)
    probes = []
    for _ in range(count):
        scene = sample_scene(rng, KNOWN_SHAPES)
        probes.append(Probe(caption(scene), scene, ("shape", "colour", "background")))
    return probes


def read_probes(evaluator: Evaluator, generate: Generator, probes: Sequence[Probe], seed: int) -> list[Reading]:
    """What the evaluator reads in each probe's generated image."""
    return read(evaluator, generate([p.prompt for p in probes], seed))


def passed_share(probes: Sequence[Probe], readings: Sequence[Reading]) -> float:
    """Share of the probes read as asked."""
    return sum(p.passed(r) for p, r in zip(probes, readings)) / len(probes)


def pass_rate(evaluator: Evaluator, generate: Generator, probes: Sequence[Probe], seed: int) -> float:
    """Share of the probes whose generated image the evaluator reads as asked."""
    return passed_share(probes, read_probes(evaluator, generate, probes, seed))


def confused_shape(readings: Sequence[Reading]) -> str:
    """The known shape the base model draws most often for the subject's prompts: the class the new token starts out
    as (DreamBooth's "class noun", found by reading instead of naming). Measured: not the class the drift goes to
    (bench/README.md, "Where the drift goes")."""
    counts = Counter(r.shape for r in readings if r.shape in KNOWN_SHAPES)
    if not counts:
        raise ValueError("the base model drew no known shape for the subject's prompts")
    return max(sorted(counts), key=counts.__getitem__)


def shape_share(readings: Sequence[Reading], shape: str) -> float:
    """Share of the images read as ``shape``: on known-shape prompts and the subject's shape, how far the subject
    leaks into prompts that never named it."""
    return sum(r.shape == shape for r in readings) / len(readings)



@dataclass(frozen=True)
class Misses:
    """Why probes failed, head by head: how many read each checked head wrong (a probe can miss several), and what
    the shape head read instead of the asked shape."""

    probes: int
    by_head: dict[str, int]
    shapes_instead: dict[str, int]

    def describe(self) -> str:
        """``shape 12 of 32 (circle 10, hexagon 2), colour 0, background 1``."""
        parts = []
        for head, count in self.by_head.items():
            instead = ""
            if head == "shape" and self.shapes_instead:
                instead = " (" + ", ".join(f"{shape} {n}" for shape, n in self.shapes_instead.items()) + ")"
            parts.append(f"{head} {count}{instead}")
        return f"missed {', '.join(parts)} of {self.probes}"


def misses(probes: Sequence[Probe], readings: Sequence[Reading]) -> Misses:
    """Count each probe's missed heads; the shapes drawn instead are listed most common first, ties by name."""
    heads = [head for head in ("shape", "colour", "background") if any(head in p.checks for p in probes)]
    by_head = dict.fromkeys(heads, 0)
    instead: Counter[str] = Counter()
    for probe, reading in zip(probes, readings, strict=True):
        for head in probe.missed(reading):
            by_head[head] += 1
            if head == "shape":
                instead[reading.shape] += 1
    ordered = sorted(instead.items(), key=lambda item: (-item[1], item[0]))
    return Misses(probes=len(probes), by_head=by_head, shapes_instead=dict(ordered))


def passed_by(probes: Sequence[Probe], readings: Sequence[Reading], attribute: str) -> dict[str, tuple[int, int]]:
    """Probes read as asked / probes, per asked value of ``attribute`` ("colour" or "background") in the world's
    order: which new colours and backgrounds the subject carries to, and which it does not."""
    order = {"colour": COLOUR_NAMES, "background": BACKGROUND_NAMES}[attribute]
    tally = {value: [0, 0] for value in order}
    for probe, reading in zip(probes, readings, strict=True):
        counts = tally[getattr(probe.expected, attribute)]
        counts[0] += probe.passed(reading)
        counts[1] += 1
    return {value: (passed, asked) for value, (passed, asked) in tally.items() if asked}
