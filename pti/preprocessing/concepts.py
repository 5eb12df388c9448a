"""Concept folders: which trigger word, class word and repeat count each uploaded image belongs to.

kohya's naming, ``<repeats>_<trigger> <class>/`` (``10_TOK person/``), and plain ``<trigger>/`` folders (the folder
is named after one of the run's trigger words) mark a concept; an image belongs to the nearest such folder above it,
so a wrapping folder (``my-upload/10_TOK person/a.jpg``) changes nothing. Images outside every concept folder keep
the single-concept behaviour (the caption prefix's trigger, repeats 1).

Class (regularisation) uploads use the same naming without a trigger: ``<repeats>_<class>/`` (``1_person/``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

KOHYA_FOLDER = re.compile(r"(\d+)_(.*)")


class ConceptFolderError(ValueError):
    """A concept folder's name or place cannot be used; one line naming the folder."""


@dataclass(frozen=True)
class Concept:
    folder: str  # the folder's path relative to the upload root, posix style
    trigger: str | None  # the trigger word in the run's case; None in a class-image upload
    class_word: str  # "" when the name gives none
    repeats: int

    @property
    def phrase(self) -> str:
        """What the images' generated captions name: ``TOK person``."""
        return " ".join(part for part in (self.trigger, self.class_word) if part)


TOP_LEVEL = Concept(folder="", trigger=None, class_word="", repeats=1)


def parse_concept_folder(folder: str, triggers: tuple[str, ...], with_trigger: bool) -> Concept | None:
    """The concept a folder (path relative to the upload root) names, or None for an ordinary folder.
    ``with_trigger``: instance images (``10_TOK person``); otherwise class images (``1_person``)."""
    name = folder.rsplit("/", 1)[-1]
    kohya = KOHYA_FOLDER.fullmatch(name)
    if kohya is None:
        trigger = _known_trigger(name, triggers) if with_trigger else None
        return Concept(folder, trigger, "", 1) if trigger else None
    repeats, rest = int(kohya.group(1)), " ".join(kohya.group(2).split())
    if repeats < 1:
        raise ConceptFolderError(f"folder {folder!r}: repeats must be at least 1, got {repeats} (kohya naming "
                                 f"<repeats>_<trigger> <class>, e.g. 10_TOK person)")
    if not with_trigger:
        return Concept(folder, None, rest, repeats)
    first, _, class_word = rest.partition(" ")
    trigger = _known_trigger(first, triggers)
    if trigger is None:
        raise ConceptFolderError(f"folder {folder!r}: {first!r} is not a trigger word of token_string "
                                 f"({','.join(triggers)}); rename the folder or add {first} to token_string")
    return Concept(folder, trigger, class_word, repeats)


def _known_trigger(word: str, triggers: tuple[str, ...]) -> str | None:
    """The run's trigger word that ``word`` names (exact case first, then ignoring case), or None."""
    if word in triggers:
        return word
    folded = [t for t in triggers if t.lower() == word.lower()]
    return folded[0] if len(folded) == 1 else None


def assign_concepts(root: Path, images: list[Path], triggers: tuple[str, ...],
                    with_trigger: bool) -> dict[Path, Concept]:
    """Each image's concept (:data:`TOP_LEVEL` outside concept folders). Concept folders inside concept folders
    are refused: which trigger their images get would be a guess."""
    by_folder: dict[str, Concept | None] = {}
    assigned: dict[Path, Concept] = {}
    for image in images:
        parts = image.relative_to(root).parts[:-1]
        found: list[Concept] = []
        for depth in range(1, len(parts) + 1):
            folder = "/".join(parts[:depth])
            if folder not in by_folder:
                by_folder[folder] = parse_concept_folder(folder, triggers, with_trigger)
            if by_folder[folder] is not None:
                found.append(by_folder[folder])
        if len(found) > 1:
            raise ConceptFolderError(f"folder {found[-1].folder!r} is a concept folder inside the concept folder "
                                     f"{found[0].folder!r}; put each concept's folder at the same level")
        assigned[image] = found[0] if found else TOP_LEVEL
    return assigned


def concept_prefix(prefix: str, primary_trigger: str, concept: Concept) -> str:
    """The caption prefix for a concept's generated captions: the prefix's trigger replaced by the concept's
    ``trigger class`` (``a photo of TOK, `` → ``a photo of STY style, ``), or the phrase put in front when the
    prefix names no trigger."""
    if concept.trigger is None:
        return prefix
    pattern = re.compile(rf"(?<!\w){re.escape(primary_trigger)}(?!\w)")
    if primary_trigger and pattern.search(prefix):
        return pattern.sub(lambda _: concept.phrase, prefix, count=1)
    return f"{concept.phrase}, {prefix}" if prefix.strip() else f"{concept.phrase}, "


def with_trigger(caption: str, concept: Concept) -> str:
    """A given caption (sidecar file or table) of a concept's image: its trigger in the run's case, put in front
    when the caption does not name it."""
    if concept.trigger is None:
        return caption
    pattern = re.compile(rf"(?<![\w<]){re.escape(concept.trigger)}(?![\w>])", flags=re.IGNORECASE)
    if pattern.search(caption):
        return pattern.sub(concept.trigger, caption)
    return f"{concept.trigger}, {caption}"
