"""Where to crop a photo and at what size: square crops around a focus point, or SDXL aspect-ratio buckets."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

BUCKET_STEP = 64
MAX_BUCKET_ASPECT = 2.5  # SDXL's widest training bucket is 1536x640 (2.4)


@dataclass(frozen=True)
class Crop:
    """A crop box in photo pixels and the size it is resized to."""

    left: int
    top: int
    width: int
    height: int
    target: tuple[int, int]  # (width, height) of the training image

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.left, self.top, self.left + self.width, self.top + self.height

    @property
    def upscaled(self) -> bool:
        return self.width < self.target[0]

    @property
    def upscale_factor(self) -> float:
        return self.target[0] / self.width

    def offset_at_target_scale(self) -> tuple[int, int]:
        """(top, left) of the crop in the photo scaled to the crop's resolution: SDXL's crop conditioning."""
        scale = self.target[0] / self.width
        return round(self.top * scale), round(self.left * scale)


def sdxl_buckets(resolution: int, min_side: int | None = None, max_side: int | None = None) -> list[tuple[int, int]]:
    """(width, height) buckets with sides in multiples of 64 and about `resolution`² pixels, as SDXL was trained on;
    for 1024 these include 1024x1024, 1152x896, 1216x832, 1344x768 and 1536x640 and their transposes. `min_side` /
    `max_side` drop buckets with a shorter / longer side (kohya's min/max_bucket_reso)."""
    area = resolution * resolution
    landscape = set()
    for width in range(resolution // BUCKET_STEP * BUCKET_STEP, 4 * resolution + 1, BUCKET_STEP):
        height = (area // width) // BUCKET_STEP * BUCKET_STEP
        if height >= BUCKET_STEP and width / height <= MAX_BUCKET_ASPECT:
            landscape.add((width, height))
    buckets = landscape | {(height, width) for width, height in landscape}
    return sorted(bucket for bucket in buckets if (min_side is None or min(bucket) >= min_side)
                  and (max_side is None or max(bucket) <= max_side))


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    aspect = math.log(size[0] / size[1])
    return min(buckets, key=lambda bucket: abs(math.log(bucket[0] / bucket[1]) - aspect))


def crop_around(size: tuple[int, int], target: tuple[int, int], focus: tuple[float, float]) -> Crop:
    """The largest crop of the target's aspect ratio inside a photo of `size`, centred on `focus` where the photo's
    edges allow."""
    width, height = size
    aspect = target[0] / target[1]
    crop_w = min(width, round(height * aspect))
    crop_h = min(height, round(crop_w / aspect))
    left = clamp(round(focus[0] - crop_w / 2), 0, width - crop_w)
    top = clamp(round(focus[1] - crop_h / 2), 0, height - crop_h)
    return Crop(left=left, top=top, width=crop_w, height=crop_h, target=target)


def clamp(value: int, low: int, high: int) -> int:
    return max(low, min(value, high))


def centre_of(size: tuple[int, int]) -> tuple[float, float]:
    return size[0] / 2, size[1] / 2


def centre_of_mass(mask: Image.Image, baseline: int = 0) -> tuple[float, float]:
    """Weighted centre of a mode "L" mask above `baseline` (a floor weight everywhere would pull it to the middle),
    in the mask's pixel coordinates; the middle for an empty mask."""
    weights = np.clip(np.asarray(mask, dtype=np.float64) - baseline, 0, None)
    total = weights.sum()
    if total == 0:
        return centre_of(mask.size)
    rows, cols = np.indices(weights.shape)
    return float((cols * weights).sum() / total), float((rows * weights).sum() / total)


def cut(image: Image.Image, crop: Crop) -> Image.Image:
    """The crop resized to its target with Lanczos (upscaling small photos too)."""
    return image.resize(crop.target, Image.Resampling.LANCZOS, box=crop.box, reducing_gap=3.0)


def cut_mask(mask: Image.Image, crop: Crop) -> Image.Image:
    """The crop of a mask resized bilinearly: Lanczos would ring below the mask's floor around a face's edge."""
    return mask.resize(crop.target, Image.Resampling.BILINEAR, box=crop.box)
