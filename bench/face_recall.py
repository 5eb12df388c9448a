"""Benchmark: how many faces the face masker finds, before and after turned passes (issue 14), on real photos and
harder variants of them (mirrored, turned, zoomed out), and how many false faces it finds on photos without one.

    .venv/bin/python bench/face_recall.py [--detection-max-side 1024]

Photos with a face (checked by eye): `../shared/datasets/kiriko` (13 renders of a game character, one face each;
3, 6 and 11 look down and to the side), scikit-image's astronaut (frontal) and cameraman (head bowed and turned to
his camera's viewfinder). Photos without a human face: `../shared/datasets/monster` (a knitted toy with eyes and a
mouth) and scikit-image's chelsea (a cat), coffee, rocket, hubble_deep_field, retina, coins, moon, brick, grass,
gravel, horse and page. Every variant of every photo runs through both detectors.

A face counts as found only where it is: the centre of the box found on a variant must lie within half a face of
where the old detector's face on the original photo (every one checked by eye) moves to under that variant. Without
../shared only the scikit-image photos run.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GLOG_minloglevel", "2")

from pti.preprocessing.masking import FaceBox, FaceMasker, downscaled, relative_box_to_pixels  # noqa: E402

SHARED = ROOT.parent / "shared" / "datasets"
DOWN_AND_SIDEWAYS = {"kiriko/3", "kiriko/6", "kiriko/11", "cameraman"}
FACELESS_SKIMAGE = ("chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "coins", "moon", "brick", "grass",
                    "gravel", "horse", "page")
ZOOM_OUT = 3  # the zoomed-out variant: the photo at a third of its size in the middle of a grey canvas of its size

Point = tuple[float, float]


@dataclass(frozen=True)
class Variant:
    name: str
    image: Callable[[Image.Image], Image.Image]
    point: Callable[[Point, tuple[int, int]], Point]  # where a photo point lands, given the photo's size


def turned(degrees: float) -> Variant:
    def point(p: Point, size: tuple[int, int]) -> Point:
        angle = math.radians(degrees)
        cos, sin = math.cos(angle), math.sin(angle)
        canvas = (abs(cos) * size[0] + abs(sin) * size[1], abs(sin) * size[0] + abs(cos) * size[1])
        dx, dy = p[0] - size[0] / 2, p[1] - size[1] / 2
        return canvas[0] / 2 + cos * dx + sin * dy, canvas[1] / 2 - sin * dx + cos * dy

    return Variant(f"turned {degrees:+g}", lambda im: im.rotate(degrees, Image.Resampling.BILINEAR, expand=True),
                   point)


def zoomed_out(image: Image.Image) -> Image.Image:
    canvas = Image.new("RGB", image.size, (128, 128, 128))
    small = image.resize((image.width // ZOOM_OUT, image.height // ZOOM_OUT), Image.Resampling.LANCZOS)
    canvas.paste(small, ((image.width - small.width) // 2, (image.height - small.height) // 2))
    return canvas


def zoomed_out_point(p: Point, size: tuple[int, int]) -> Point:
    left, top = (size[0] - size[0] // ZOOM_OUT) // 2, (size[1] - size[1] // ZOOM_OUT) // 2
    return left + p[0] / ZOOM_OUT, top + p[1] / ZOOM_OUT


VARIANTS = [
    Variant("original", lambda im: im, lambda p, size: p),
    Variant("mirrored", ImageOps.mirror, lambda p, size: (size[0] - p[0], p[1])),
    *[turned(degrees) for degrees in (30, -30, 60, -60, 90, -90, 180)],
    Variant("zoomed out x3", zoomed_out, zoomed_out_point),
]


def skimage_photo(name: str) -> Image.Image:
    from skimage import data

    pixels = getattr(data, name)()
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8) * 255
    return Image.fromarray(pixels).convert("RGB")


def face_photos() -> Iterator[tuple[str, Image.Image]]:
    kiriko = SHARED / "kiriko"
    if kiriko.is_dir():
        for path in sorted(kiriko.glob("*.jpg"), key=lambda p: int(p.name.split(".")[0])):
            with Image.open(path) as image:
                yield f"kiriko/{path.name.split('.')[0]}", image.convert("RGB")
    yield "astronaut", skimage_photo("astronaut")
    yield "cameraman", skimage_photo("camera")


def faceless_photos() -> Iterator[tuple[str, Image.Image]]:
    monster = SHARED / "monster"
    if monster.is_dir():
        for path in sorted(monster.glob("*.jpg")):
            with Image.open(path) as image:
                yield f"monster/{path.stem}", image.convert("RGB")
    for name in FACELESS_SKIMAGE:
        yield name, skimage_photo(name)


@dataclass
class Tally:
    photos: int = 0
    old: int = 0
    new: int = 0
    old_cpu: float = 0.0
    new_cpu: float = 0.0


def old_face(masker: FaceMasker, image: Image.Image) -> FaceBox | None:
    """The detector before issue 14: the upright photo only, the largest face of the full-range detector, else of
    the short-range one, at mediapipe's 0.5 confidence, nothing confirmed by the mesh."""
    small, factor = downscaled(image, masker.detection_max_side)
    pixels = np.asarray(small)
    for detector in masker.detectors:
        boxes = [relative_box_to_pixels(found.location_data.relative_bounding_box, small.width, small.height)
                 for found in detector.process(pixels).detections or []]
        if boxes:
            return max(boxes, key=lambda box: box.area).scaled(1 / factor)
    return None


def new_face(masker: FaceMasker, image: Image.Image) -> FaceBox | None:
    found = masker.face_mask(image)
    return None if found is None else found.face


def timed(find: Callable[[FaceMasker, Image.Image], FaceBox | None], masker: FaceMasker,
          image: Image.Image) -> tuple[FaceBox | None, float]:
    start = time.process_time()
    face = find(masker, image)
    return face, time.process_time() - start


def is_at(found: FaceBox | None, expected: FaceBox, variant: Variant, size: tuple[int, int]) -> bool:
    if found is None:
        return False
    centre = variant.point(expected.centre, size)
    reach = 0.5 * max(expected.right - expected.left, expected.bottom - expected.top)
    if variant.name.startswith("zoomed"):
        reach /= ZOOM_OUT
    return math.dist(found.centre, centre) <= reach


def group_of(photo: str) -> str:
    if photo in DOWN_AND_SIDEWAYS:
        return "down and sideways"
    return "kiriko" if photo.startswith("kiriko") else "scikit-image"


def run(detection_max_side: int) -> None:
    tallies: dict[tuple[str, str], Tally] = {}
    misses: list[str] = []
    with FaceMasker(detection_max_side, 0.1) as masker:
        for photo, image in face_photos():
            reference = old_face(masker, image)
            if reference is None:
                print(f"{photo}: no upright face on the original; left out")
                continue
            for variant in VARIANTS:
                shown = variant.image(image)
                tally = tallies.setdefault((f"faces: {group_of(photo)}", variant.name), Tally())
                old_box, old_cpu = timed(old_face, masker, shown)
                new_box, new_cpu = timed(new_face, masker, shown)
                tally.photos += 1
                tally.old += is_at(old_box, reference, variant, image.size)
                tally.new += is_at(new_box, reference, variant, image.size)
                tally.old_cpu += old_cpu
                tally.new_cpu += new_cpu
                if not is_at(new_box, reference, variant, image.size):
                    misses.append(f"{photo} {variant.name}")
        for photo, image in faceless_photos():
            group = "no face: monster" if photo.startswith("monster") else "no face: scikit-image"
            for variant in VARIANTS:
                shown = variant.image(image)
                tally = tallies.setdefault((group, variant.name), Tally())
                old_box, old_cpu = timed(old_face, masker, shown)
                new_box, new_cpu = timed(new_face, masker, shown)
                tally.photos += 1
                tally.old += old_box is not None
                tally.new += new_box is not None
                tally.old_cpu += old_cpu
                tally.new_cpu += new_cpu
                if new_box is not None:
                    misses.append(f"{photo} {variant.name}: false face")
    print_table(tallies)
    print("\nnew detector misses and false faces: " + (", ".join(misses) or "none"))


def print_table(tallies: dict[tuple[str, str], Tally]) -> None:
    print("| photo set | variant | photos | found, old | found, new | CPU ms/photo old | CPU ms/photo new |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    groups: dict[str, Tally] = {}
    for (group, variant), tally in tallies.items():
        print(f"| {group} | {variant} | {tally.photos} | {tally.old} | {tally.new} | "
              f"{1000 * tally.old_cpu / tally.photos:.0f} | {1000 * tally.new_cpu / tally.photos:.0f} |")
        total = groups.setdefault(group, Tally())
        for field in ("photos", "old", "new", "old_cpu", "new_cpu"):
            setattr(total, field, getattr(total, field) + getattr(tally, field))
    for group, total in groups.items():
        print(f"| **{group}** | **all variants** | {total.photos} "
              f"| {total.old} ({100 * total.old / total.photos:.0f}%) "
              f"| {total.new} ({100 * total.new / total.photos:.0f}%) | {1000 * total.old_cpu / total.photos:.0f} "
              f"| {1000 * total.new_cpu / total.photos:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detection-max-side", type=int, default=1024)
    run(parser.parse_args().detection_max_side)


if __name__ == "__main__":
    main()
