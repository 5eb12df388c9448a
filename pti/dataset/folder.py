"""Reads the dataset folder of ``docs/CONTRACTS.md`` (``captions.csv``) or a plain folder of images."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from pti.dataset.errors import DatasetError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass(frozen=True)
class DatasetItem:
    image_path: Path
    mask_path: Path | None
    caption: str  # as written, with trigger words (not yet replaced)
    original_size: tuple[int, int]  # (height, width) of the decoded photo
    crop_top_left: tuple[int, int]  # (top, left)
    repeats: int = 1  # times the item is seen per epoch (kohya folder repeats)
    concept: str = ""  # the concept folder's trigger (or class) word; "" outside concept folders


def read_dataset_folder(folder: Path, caption_prefix: str = "") -> list[DatasetItem]:
    """Items of a dataset folder (``captions.csv`` present) or of a plain folder of images (caption_prefix)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"dataset folder {folder} does not exist")
    csv_path = folder / "captions.csv"
    items = _read_captions_csv(folder, csv_path) if csv_path.is_file() else _read_plain_folder(folder, caption_prefix)
    if not items:
        raise DatasetError(f"no images found in {folder}; give at least one .png/.jpg/.webp image")
    return items


def _read_captions_csv(folder: Path, csv_path: Path) -> list[DatasetItem]:
    items = []
    with csv_path.open(newline="", encoding="utf-8") as handle:
        for line, row in enumerate(csv.DictReader(handle), start=2):
            try:
                image_path = folder / row["image_file"]
                mask_path = folder / row["mask_file"] if row.get("mask_file") else None
                item = DatasetItem(
                    image_path=image_path,
                    mask_path=mask_path,
                    caption=row["caption"],
                    original_size=(int(row["original_height"]), int(row["original_width"])),
                    crop_top_left=(int(row["crop_top"]), int(row["crop_left"])),
                    repeats=_optional_int(row, "repeats", default=1),
                    concept=row.get("concept") or "",
                )
            except (KeyError, TypeError, ValueError) as err:
                raise DatasetError(f"{csv_path} line {line}: bad or missing column ({err})") from None
            if item.repeats < 1:
                raise DatasetError(f"{csv_path} line {line}: repeats must be at least 1, got {item.repeats}")
            for path in (item.image_path, item.mask_path):
                if path is not None and not path.is_file():
                    raise DatasetError(f"{csv_path} line {line}: file {path.name} does not exist")
            items.append(item)
    return items


def _optional_int(row: dict, column: str, default: int) -> int:
    """An integer column that older dataset folders do not have (empty or absent: ``default``)."""
    text = row.get(column)
    return int(text) if text else default


def _read_plain_folder(folder: Path, caption_prefix: str) -> list[DatasetItem]:
    items = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            with Image.open(path) as image:
                width, height = ImageOps.exif_transpose(image).size
            items.append(DatasetItem(path, None, caption_prefix.strip(), (height, width), (0, 0)))
    return items
