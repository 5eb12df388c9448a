"""Find the photos in an upload and decode each one into an upright RGB image, refusing image bombs."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
CAPTION_SUFFIXES = (".txt", ".caption")
CAPTION_TABLE_NAMES = frozenset({"caption.csv", "captions.csv"})
SKIPPED_FOLDERS = frozenset({"__MACOSX"})
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000  # a 100-megapixel photo; anything larger is treated as a decompression bomb
EXIF_ORIENTATION_TAG = 0x0112
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height

Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_IMAGE_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageBombError(ValueError):
    """An image declares more pixels than the configured limit."""


class UnreadableImageError(ValueError):
    """An image is corrupt, truncated or in a format that cannot be decoded."""


@dataclass(frozen=True)
class Photo:
    name: str  # path relative to the upload's root, posix style
    image: Image.Image  # upright RGB, possibly decoded at a reduced JPEG scale
    original_size: tuple[int, int]  # (width, height) of the full-resolution upright photo


def list_upload_files(root: Path) -> tuple[list[Path], list[Path]]:
    """Image files and other (non-hidden) files under `root`, sorted; macOS metadata and dot-files are skipped."""
    images: list[Path] = []
    others: list[Path] = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") or part in SKIPPED_FOLDERS for part in rel.parts):
            if path.is_file():
                logger.info("skipping %s (hidden or macOS metadata)", rel.as_posix())
            continue
        if not path.is_file():
            continue
        (images if path.suffix.lower() in IMAGE_SUFFIXES else others).append(path)
    return images, others


def note_non_images(root: Path, others: list[Path]) -> None:
    for path in others:
        is_caption = path.suffix.lower() in CAPTION_SUFFIXES or path.name.lower() in CAPTION_TABLE_NAMES
        if not is_caption:
            logger.warning("skipping %s: not an image (%s)", path.relative_to(root).as_posix(),
                           path.suffix or "no extension")


def load_photo(path: Path, name: str, min_side: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Photo:
    """Decode `path` upright in RGB. JPEGs much larger than `min_side` are decoded at a reduced scale (never below
    `min_side` on the short side), which is what makes multi-megapixel phone photos fast."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                width, height = opened.size
                if width * height > max_pixels:
                    raise ImageBombError(f"{name}: {width}x{height} is {width * height} pixels, more than the "
                                         f"limit of {max_pixels} (decompression bomb)")
                orientation = opened.getexif().get(EXIF_ORIENTATION_TAG, 1)
                original_size = (height, width) if orientation in TRANSPOSING_ORIENTATIONS else (width, height)
                scale = min(width, height) / max(min_side, 1)
                if opened.format == "JPEG" and scale >= 2:
                    opened.draft("RGB", (int(width / scale) + 1, int(height / scale) + 1))
                opened.load()
                upright = ImageOps.exif_transpose(opened)
                rgb = to_rgb(upright)
    except ImageBombError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageBombError(f"{name}: refused as a decompression bomb: {error}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as error:
        raise UnreadableImageError(f"{name}: cannot be decoded ({error})") from None
    return Photo(name=name, image=rgb, original_size=original_size)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: transparency composited on white, 16/32-bit scaled rather than clipped."""
    if image.mode.startswith("I;16"):
        return Image.fromarray(scale_to_uint8(np.asarray(image), peak=65535.0)).convert("RGB")
    if image.mode in ("I", "F"):
        return Image.fromarray(scale_to_uint8(np.asarray(image), peak=guess_peak(np.asarray(image)))).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def guess_peak(pixels: np.ndarray) -> float:
    """White level of a 32-bit integer or float image, whose mode does not say which range it uses."""
    top = float(pixels.max(initial=0))
    if np.issubdtype(pixels.dtype, np.floating) and top <= 1.0:
        return 1.0
    return 255.0 if top <= 255 else 65535.0


def scale_to_uint8(pixels: np.ndarray, peak: float) -> np.ndarray:
    return np.clip(np.rint(pixels.astype(np.float64) / peak * 255.0), 0, 255).astype(np.uint8)
