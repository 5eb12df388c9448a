"""preview.png: every training crop with its mask overlaid and its caption underneath."""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

THUMB = 192
COLUMNS = 6
CAPTION_LINES = 4
LINE_HEIGHT = 13
WRAP_CHARS = 30
LABEL_CHARS = 38
MASK_SHADE = (20, 30, 90)
MASK_SHADE_STRENGTH = 0.6  # how dark a zero-weight pixel becomes


@dataclass(frozen=True)
class SheetEntry:
    image: Path
    mask: Path | None
    caption: str
    label: str  # file name and what preprocessing decided (face found, bucket…)


def overlay_mask(image: Image.Image, mask: Image.Image) -> Image.Image:
    """Shade the low-weight parts dark blue, so the parts that count stand out."""
    shade = Image.new("RGB", image.size, MASK_SHADE)
    alpha = mask.point(lambda weight: round((255 - weight) * MASK_SHADE_STRENGTH))
    return Image.composite(shade, image, alpha)


def thumbnail(entry: SheetEntry) -> Image.Image:
    with Image.open(entry.image) as opened:
        image = opened.convert("RGB")
    if entry.mask is not None:
        with Image.open(entry.mask) as mask:
            image = overlay_mask(image, mask.convert("L"))
    image.thumbnail((THUMB, THUMB), Image.Resampling.LANCZOS)
    return image


def write_contact_sheet(entries: list[SheetEntry], path: Path) -> Path:
    font = ImageFont.load_default()
    columns = min(COLUMNS, max(1, len(entries)))
    rows = math.ceil(len(entries) / columns)
    text_height = LINE_HEIGHT * (CAPTION_LINES + 1)
    cell_w, cell_h = THUMB + 8, THUMB + 8 + text_height
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for index, entry in enumerate(entries):
        x, y = (index % columns) * cell_w + 4, (index // columns) * cell_h + 4
        thumb = thumbnail(entry)
        sheet.paste(thumb, (x + (THUMB - thumb.width) // 2, y + (THUMB - thumb.height) // 2))
        draw.text((x, y + THUMB + 2), entry.label[:LABEL_CHARS], fill=(90, 90, 90), font=font)
        lines = textwrap.wrap(entry.caption, WRAP_CHARS)
        if len(lines) > CAPTION_LINES:
            lines = lines[:CAPTION_LINES - 1] + [lines[CAPTION_LINES - 1][:WRAP_CHARS - 1] + "..."]
        for line_index, line in enumerate(lines):
            draw.text((x, y + THUMB + 2 + LINE_HEIGHT * (line_index + 1)), line, fill="black", font=font)
    sheet.save(path, compress_level=1)
    return path
