"""Intermediate weights in trained_model.tar: where each saved step lives, how a source names one, and the contact
sheet that puts every step's validation samples side by side.

A LoRA run with ``checkpointing_steps`` writes ``steps/<step, 6 digits>/`` for every checkpoint before the last
step: the same weight files as the tar's top level (written by :func:`export.write_weight_files`) with that step's
validation samples in ``samples/``. ``steps/contact_sheet.png`` has one row per saved step and one for the final
weights, one column per validation prompt. A trained-weights source selects a step with the suffix ``#step=<n>``
(a URL fragment, which HTTP clients never send to the server, so the same download serves every step).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

STEPS_DIR = "steps"
CONTACT_SHEET_FILE = "contact_sheet.png"
STEP_DIGITS = 6
STEP_SUFFIX = re.compile(r"#step=([^#]*)$")
THUMB = 192
LABEL_WIDTH = 96
HEADER = 14  # the prompts above the columns


class StepSelectionError(ValueError):
    """A ``#step=`` suffix that is not a step number, one line."""


def step_folder(out_dir: Path, step: int) -> Path:
    """``out_dir/steps/000500`` for step 500."""
    return Path(out_dir) / STEPS_DIR / f"{step:0{STEP_DIGITS}d}"


def saved_steps(out_dir: Path) -> list[int]:
    """The steps saved under ``out_dir/steps``, in increasing order."""
    root = Path(out_dir) / STEPS_DIR
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def split_step(source: str) -> tuple[str, int | None]:
    """``"https://host/model.tar#step=500"`` → ``("https://host/model.tar", 500)``; no suffix → ``(source, None)``."""
    match = STEP_SUFFIX.search(source)
    if match is None:
        return source, None
    value = match.group(1)
    if not value.isdigit() or int(value) < 1:
        raise StepSelectionError(f"'#step={value}' must name a saved step, a whole number such as #step=500")
    return source[:match.start()], int(value)


@dataclass(frozen=True)
class SheetRow:
    label: str  # e.g. "step 500" or "final"
    images: list[Path]  # one per validation prompt, in prompt order


def write_steps_contact_sheet(rows: list[SheetRow], prompts: list[str], path: Path) -> Path:
    """One row per step, one column per prompt (the prompt written above its column), the step on the left."""
    font = ImageFont.load_default()
    columns = max(len(row.images) for row in rows)
    header = HEADER
    sheet = Image.new("RGB", (LABEL_WIDTH + columns * (THUMB + 4), header + len(rows) * (THUMB + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    for column, prompt in enumerate(prompts[:columns]):
        draw.text((LABEL_WIDTH + column * (THUMB + 4), 1), prompt[:32], fill="black", font=font)
    for index, row in enumerate(rows):
        top = header + index * (THUMB + 4)
        draw.text((4, top + THUMB // 2), row.label, fill="black", font=font)
        for column, image_path in enumerate(row.images):
            with Image.open(image_path) as opened:
                thumb = opened.convert("RGB")
            thumb.thumbnail((THUMB, THUMB), Image.Resampling.LANCZOS)
            sheet.paste(thumb, (LABEL_WIDTH + column * (THUMB + 4), top))
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp.png")
    sheet.save(staging)
    staging.replace(path)
    return path
