"""Small training sets on disk for the dataset and trainer tests (64x64, the layout of docs/CONTRACTS.md)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from threads import TORCH_THREADS

SIZE = 64
HEADER = ["image_file", "mask_file", "caption", "original_width", "original_height", "crop_top", "crop_left",
          "width", "height"]


def concept_image(index: int, size: int = SIZE, width: int | None = None) -> Image.Image:
    """A coloured background with a textured square in the middle: the 'concept' the masks point at."""
    rng = np.random.default_rng(index)
    width = width or size
    pixels = np.full((size, width, 3), 40 * (index % 4), np.uint8)
    pixels[..., index % 3] = 200
    top, left = size // 4, (width - size // 2) // 2
    pixels[top:top + size // 2, left:left + size // 2] = rng.integers(0, 255, (size // 2, size // 2, 3))
    return Image.fromarray(pixels)


def centre_mask(size: int = SIZE, floor: int = 25, width: int | None = None) -> Image.Image:
    width = width or size
    mask = np.full((size, width), floor, np.uint8)
    top, left = size // 4, (width - size // 2) // 2
    mask[top:top + size // 2, left:left + size // 2] = 255
    return Image.fromarray(mask, mode="L")


def write_dataset_folder(folder: Path, captions: list[str], with_masks: bool = True,
                         widths: list[int] | None = None) -> Path:
    """A dataset folder as preprocessing writes it: images/, masks/, captions.csv (``widths``: per-image widths,
    as bucketing makes them; default square)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    rows = []
    for index, caption in enumerate(captions):
        image_file = f"images/{index:03d}.png"
        width = widths[index] if widths else SIZE
        concept_image(index, width=width).save(folder / image_file)
        mask_file = ""
        if with_masks:
            mask_file = f"masks/{index:03d}.png"
            centre_mask(width=width).save(folder / mask_file)
        rows.append([image_file, mask_file, caption, 640 + index, 480, 3 * index, 5, width, SIZE])
    with (folder / "captions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        writer.writerows(rows)
    return folder


def write_plain_folder(folder: Path, count: int, size: int = SIZE) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        concept_image(index, size).save(folder / f"photo{index}.png")
    return folder


def write_photo_zip(folder: Path, count: int, size: int = SIZE) -> Path:
    """``folder/photos.zip``: ``count`` plain-folder photos at the zip's top level, as a user uploads them."""
    import zipfile

    photos = write_plain_folder(folder / "photos", count, size)
    archive = folder / "photos.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for photo in sorted(photos.iterdir()):
            handle.write(photo, photo.name)
    return archive


def write_noise_photos(folder: Path, count: int, size: int) -> Path:
    """``count`` smooth random colour images (a 4x4 noise upscaled), the same for every run."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{index}.png")
    return folder


def single_torch_thread():
    """Generator for a module fixture: tiny-model ops are far faster on one thread when the cores are shared
    (OpenMP workers spin-waiting for each other); restores the previous count afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)
    yield
    torch.set_num_threads(previous)
