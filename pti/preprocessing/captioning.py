"""Captions for training photos, in order of precedence: sidecar files, a caption table, an image-captioning model
(BLIP by default), and finally the caption prefix alone."""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from pti.preprocessing.image_loading import CAPTION_SUFFIXES, CAPTION_TABLE_NAMES

logger = logging.getLogger(__name__)

DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-large"


class CaptionTableError(ValueError):
    """A caption.csv/captions.csv cannot be used."""


def sidecar_captions(images: list[Path]) -> dict[Path, str]:
    """kohya's convention: `name.txt` or `name.caption` beside `name.jpg`."""
    captions = {}
    for image in images:
        for suffix in CAPTION_SUFFIXES:
            sidecar = image.with_suffix(suffix)
            if sidecar.is_file():
                text = " ".join(sidecar.read_text(encoding="utf-8", errors="replace").split())
                if text:
                    captions[image] = text
                    break
    return captions


def table_captions(root: Path, images: list[Path], others: list[Path]) -> dict[Path, str]:
    """cog-sdxl's convention: `caption.csv` or `captions.csv` with `image_file` and `caption` columns (any order),
    image paths relative to the table's folder. Images without a caption and captions without an image are reported
    by name."""
    tables = [path for path in others if path.name.lower() in CAPTION_TABLE_NAMES]
    captions: dict[Path, str] = {}
    for table in tables:
        captions.update(read_caption_table(root, table, images))
    if tables:
        for image in images:
            if image not in captions:
                logger.warning("%s has no caption in %s", image.relative_to(root).as_posix(),
                               " or ".join(t.relative_to(root).as_posix() for t in tables))
    return captions


def read_caption_table(root: Path, table: Path, images: list[Path]) -> dict[Path, str]:
    by_path = {image.relative_to(table.parent).as_posix().lower(): image for image in images
               if image.is_relative_to(table.parent)}
    by_name = {image.name.lower(): image for image in images}
    table_name = table.relative_to(root).as_posix()
    with table.open(encoding="utf-8-sig", errors="replace", newline="") as handle:
        reader = csv.DictReader(handle)
        columns = {(name or "").strip().lower(): name for name in reader.fieldnames or []}
        if "image_file" not in columns or "caption" not in columns:
            raise CaptionTableError(f"{table_name}: needs columns image_file and caption, found "
                                    f"{', '.join(repr(c) for c in columns) or 'no header'}")
        captions = {}
        for row in reader:
            image_file = (row[columns["image_file"]] or "").strip()
            caption = " ".join((row[columns["caption"]] or "").split())
            if not image_file:
                continue
            key = image_file.replace("\\", "/").lower()
            image = by_path.get(key) or by_name.get(Path(key).name)
            if image is None:
                logger.warning("%s: caption for %s, but there is no such image", table_name, image_file)
            elif caption:
                captions[image] = caption
    return captions


def restore_trigger_words(text: str, trigger_words: tuple[str, ...]) -> str:
    """Put trigger words back in their own case: BLIP's tokenizer lower-cases everything, and `tok` is not `TOK`."""
    for word in trigger_words:
        text = re.sub(rf"(?<![\w<]){re.escape(word)}(?![\w>])", word, text, flags=re.IGNORECASE)
    return text


class Captioner:
    """An image-to-text model loaded by id or folder through transformers' BLIP classes."""

    def __init__(self, model_id: str, device: torch.device, max_new_tokens: int) -> None:
        from transformers import BlipForConditionalGeneration, BlipProcessor

        self.processor = BlipProcessor.from_pretrained(model_id)
        self.model = BlipForConditionalGeneration.from_pretrained(model_id).to(device).eval()
        self.device = device
        self.max_new_tokens = max_new_tokens

    @torch.inference_mode()
    def caption(self, images: list[Image.Image]) -> list[str]:
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        generated = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        return [" ".join(text.split()) for text in self.processor.batch_decode(generated, skip_special_tokens=True)]


def load_captioner(model_id: str | None, device: torch.device, max_new_tokens: int) -> Captioner | None:
    """The captioner, or None (with a warning) when none is configured or it cannot be loaded."""
    if model_id is None:
        logger.warning("no captioning model configured: images without a caption get the caption prefix alone")
        return None
    try:
        return Captioner(model_id, device, max_new_tokens)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        logger.warning("captioning model %s is not available (%s): images without a caption get the caption "
                       "prefix alone", model_id, first_line)
        return None


def automatic_captions(captioner: Captioner | None, images: dict[str, Path], prefix: str,
                       trigger_words: tuple[str, ...], batch_size: int) -> dict[str, str]:
    """`prefix` + the model's caption for each image (keys are the caller's names), or `prefix` alone without a
    captioner."""
    if captioner is None:
        return {name: prefix.strip().rstrip(",;:").strip() for name in images}
    names = list(images)
    captions: dict[str, str] = {}
    batches = range(0, len(names), batch_size)
    for start in tqdm(batches, desc="captioning", unit="batch", total=len(batches)):
        batch = names[start:start + batch_size]
        for name, text in zip(batch, captioner.caption([read_rgb(images[name]) for name in batch])):
            captions[name] = (prefix + restore_trigger_words(text, trigger_words)).strip()
    return captions


def read_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")
