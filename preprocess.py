"""Turn an upload (zip/tar archive or folder of photos) into the dataset folder the trainer reads.

The dataset layout is the contract in docs/CONTRACTS.md: images/, masks/, captions.csv and preview.png. The folder is
built in a staging folder next to `output_dir` and renamed into place only when complete.
"""

from __future__ import annotations

import csv
import logging
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from pti.models.base_model import pick_runtime, resolve_source
from pti.preprocessing.captioning import (
    DEFAULT_CAPTIONER,
    automatic_captions,
    load_captioner,
    sidecar_captions,
    table_captions,
)
from pti.preprocessing.concepts import TOP_LEVEL, Concept, ConceptFolderError, assign_concepts, concept_prefix, with_trigger
from pti.preprocessing.contact_sheet import SheetEntry, write_contact_sheet
from pti.preprocessing.cropping import Crop, centre_of, centre_of_mass, crop_around, cut_mask, nearest_bucket, sdxl_buckets
from pti.preprocessing.image_loading import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGE_SUFFIXES,
    ImageBombError,
    Photo,
    UnreadableImageError,
    list_upload_files,
    load_photo,
    note_non_images,
)
from pti.preprocessing.masking import ClipSegMasker, FaceMasker
from pti.preprocessing.upscaling import SuperResolution, render_crop
from pti.preprocessing.safe_archive import DECLARED_TYPES, ExtractionLimits, safe_extract

logger = logging.getLogger(__name__)

DEFAULT_CLIPSEG = "CIDAS/clipseg-rd64-refined"
PHOTO_ARCHIVE_LIMITS = ExtractionLimits(max_members=10_000, max_total_bytes=4 * 1024**3,
                                        max_member_bytes=256 * 1024**2, max_ratio=100.0)
CAPTIONS_HEADER = ("image_file", "mask_file", "caption", "original_width", "original_height", "crop_top", "crop_left",
                   "width", "height", "repeats", "concept")
CLIPSEG_MAX_SIDE = 512  # CLIPSeg sees 352x352; a larger copy only costs time
MAX_REASONS_IN_ERROR = 3
PNG_COMPRESS_LEVEL = 1  # zlib's default level 6 made PNG encoding most of the run time, for files ~25% smaller


class PreprocessError(ValueError):
    """The upload cannot become a training set; the message says which file and why."""


@dataclass(frozen=True)
class PreprocessSettings:
    resolution: int = 1024  # side of square crops, or the ~pixel budget (resolution²) of buckets
    token_string: str = "TOK"  # the trigger word of caption_prefix and of images outside concept folders
    trigger_words: tuple[str, ...] = ()  # the run's other trigger words (concept folders); each keeps its case
    class_images: bool = False  # a class-image upload: kohya folders give repeats only, captions name no trigger
    caption_prefix: str = "a photo of TOK, "
    captioning_model: str | None = DEFAULT_CAPTIONER  # model id or folder; None: no automatic captions
    caption_max_tokens: int = 40
    use_face_detection_instead: bool = False
    mask_target_prompts: str | None = None  # CLIPSeg prompt, e.g. "a photo of a dog"
    clipseg_model: str = DEFAULT_CLIPSEG
    clipseg_temperature: float = 1.0
    crop_based_on_salience: bool = True  # centre crops on the face / mask instead of the image's middle
    use_bucketing: bool = False  # keep aspect ratios: nearest SDXL bucket instead of square crops
    bucket_min_side: int | None = None  # buckets with a shorter side are not used (None: no bound)
    bucket_max_side: int | None = None  # buckets with a longer side are not used (None: no bound)
    max_upscale: float = 4.0  # photos that would have to be enlarged more than this are skipped
    upscaler_model: str | None = None  # Swin2SR id or folder for photos smaller than the target; None: Lanczos only
    input_images_filetype: str = "infer"  # cog-sdxl's "zip" | "tar" | "infer"; the content decides
    mask_floor: float = 0.1  # weight of pixels outside the face/prompted region
    detection_max_side: int = 1024  # photos are downscaled to this before face detection
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    extraction_limits: ExtractionLimits = PHOTO_ARCHIVE_LIMITS
    caption_batch_size: int = 4
    device: str | None = None  # None: base_model.pick_runtime's choice

    def __post_init__(self) -> None:
        if self.resolution < 64 or self.resolution % 64:
            raise PreprocessError(f"resolution must be a positive multiple of 64, got {self.resolution}")
        if not 0.0 <= self.mask_floor <= 1.0:
            raise PreprocessError(f"mask_floor must be between 0 and 1, got {self.mask_floor}")
        if self.clipseg_temperature <= 0:
            raise PreprocessError(f"clipseg_temperature must be positive, got {self.clipseg_temperature}")
        if self.caption_max_tokens < 1 or self.caption_batch_size < 1:
            raise PreprocessError(f"caption_max_tokens and caption_batch_size must be at least 1, got "
                                  f"{self.caption_max_tokens} and {self.caption_batch_size}")
        if self.input_images_filetype not in DECLARED_TYPES:
            raise PreprocessError(f"input_images_filetype must be one of {', '.join(DECLARED_TYPES)}, got "
                                  f"{self.input_images_filetype!r}")
        if self.max_upscale < 1:
            raise PreprocessError(f"max_upscale must be at least 1 (1: never enlarge), got {self.max_upscale}")
        if self.use_bucketing and not self.buckets():
            raise PreprocessError(f"no SDXL bucket for resolution {self.resolution} has sides between "
                                  f"bucket_min_side={self.bucket_min_side} and bucket_max_side={self.bucket_max_side}")
        if self.detection_max_side < 128:
            raise PreprocessError(f"detection_max_side must be at least 128, got {self.detection_max_side}")

    def buckets(self) -> list[tuple[int, int]]:
        return sdxl_buckets(self.resolution, self.bucket_min_side, self.bucket_max_side) if self.use_bucketing else []

    @property
    def triggers(self) -> tuple[str, ...]:
        """Every trigger word of the run, token_string's first."""
        if self.class_images:
            return ()
        return tuple(dict.fromkeys(word for word in (self.token_string, *self.trigger_words) if word))

    @property
    def mask_mode(self) -> str:
        if self.use_face_detection_instead:
            return "face"
        return "prompt" if self.mask_target_prompts else "none"


@dataclass
class TrainingImage:
    source: Path
    name: str  # relative to the upload root
    image_file: str  # relative to the dataset folder
    mask_file: str | None
    original_size: tuple[int, int]
    crop: Crop
    concept: Concept = TOP_LEVEL
    notes: list[str] = field(default_factory=list)


def preprocess(input_images: Path, output_dir: Path, settings: PreprocessSettings) -> Path:
    """Build the dataset folder for `input_images` (archive or folder) at `output_dir`, which must not exist or be
    empty; return `output_dir`."""
    input_images, output_dir = Path(input_images), Path(output_dir)
    if not input_images.exists():
        raise PreprocessError(f"{input_images}: no such file or folder")
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise PreprocessError(f"{output_dir}: output folder already exists and is not empty")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    device = torch.device(settings.device) if settings.device else pick_runtime("fp32").device
    settings = with_local_models(settings)
    with tempfile.TemporaryDirectory(prefix=f".{output_dir.name}.preprocess-", dir=output_dir.parent) as work:
        work_dir = Path(work)
        root = upload_root(input_images, work_dir, settings)
        staging = work_dir / "dataset"
        count = build_dataset(input_images.name, root, staging, settings, device)
        if output_dir.exists():
            output_dir.rmdir()
        staging.rename(output_dir)
    logger.info("dataset of %d images written to %s", count, output_dir)
    return output_dir


def local_first(model: str | None) -> str | None:
    """A model setting as a folder when it is one, or through the weights folder's copy of a hub repo."""
    if model is None or Path(model).expanduser().is_dir():
        return model
    return str(resolve_source(model))


def with_local_models(settings: PreprocessSettings) -> PreprocessSettings:
    """The settings with every hub model read from the weights folder where it has a copy (no network)."""
    return replace(settings, captioning_model=local_first(settings.captioning_model),
                   clipseg_model=local_first(settings.clipseg_model),
                   upscaler_model=local_first(settings.upscaler_model))


def build_dataset(upload_name: str, root: Path, staging: Path, settings: PreprocessSettings,
                  device: torch.device) -> int:
    """Write the dataset for the photos under `root` into `staging`; return how many images it holds."""
    image_paths, other_paths = list_upload_files(root)
    note_non_images(root, other_paths)
    if not image_paths:
        raise PreprocessError(f"{upload_name}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))} "
                              f"among {len(other_paths)} files)")
    try:
        concepts = assign_concepts(root, image_paths, settings.triggers, with_trigger=not settings.class_images)
    except ConceptFolderError as error:
        raise PreprocessError(f"{upload_name}: {error}") from None
    (staging / "images").mkdir(parents=True)
    training_images = [replace(item, concept=concepts[item.source])
                       for item in crop_and_mask(root, image_paths, staging, settings, device)]
    log_concepts(training_images)
    captions = collect_captions(root, training_images, other_paths, staging, settings, device)
    write_captions_csv(staging / "captions.csv", training_images, captions)
    write_contact_sheet([sheet_entry(staging, item, captions[item.name]) for item in training_images],
                        staging / "preview.png")
    return len(training_images)


def upload_root(input_images: Path, work_dir: Path, settings: PreprocessSettings) -> Path:
    if input_images.is_dir():
        return input_images
    root = work_dir / "upload"
    safe_extract(input_images, root, settings.extraction_limits, declared=settings.input_images_filetype)
    return root


class PhotoModels:
    """The mask source the settings name and the optional super-resolution model. Models load on first use, so a
    run whose photos are all unusable fails before any model loads."""

    def __init__(self, settings: PreprocessSettings, device: torch.device, stack: ExitStack) -> None:
        self.settings = settings
        self.device = device
        self.stack = stack
        self.face_masker: FaceMasker | None = None
        self.clipseg: ClipSegMasker | None = None
        self.upscaler: SuperResolution | None = None

    def mask_and_focus(self, photo: Photo, notes: list[str]) -> tuple[Image.Image | None, tuple[float, float]]:
        size = photo.image.size
        if self.settings.mask_mode == "face":
            return self.face(photo, notes)
        if self.settings.mask_mode == "prompt":
            mask = self.prompt_masker().prompt_mask(photo.image, self.settings.mask_target_prompts or "")
            return mask, centre_of_mass(mask, baseline=round(self.settings.mask_floor * 255))
        return None, centre_of(size)

    def face(self, photo: Photo, notes: list[str]) -> tuple[Image.Image, tuple[float, float]]:
        if self.face_masker is None:
            self.face_masker = self.stack.enter_context(
                FaceMasker(self.settings.detection_max_side, self.settings.mask_floor))
        found = self.face_masker.face_mask(photo.image)
        if found is None:
            logger.warning("%s: no face found; using the full image as mask and a centre crop", photo.name)
            notes.append("no face")
            return Image.new("L", photo.image.size, 255), centre_of(photo.image.size)
        notes.append("face" if found.from_mesh else "face (box)")
        return found.mask, found.face.centre

    def prompt_masker(self) -> ClipSegMasker:
        if self.clipseg is None:
            try:
                self.clipseg = ClipSegMasker(self.settings.clipseg_model, self.settings.clipseg_temperature,
                                             self.settings.mask_floor, self.device, CLIPSEG_MAX_SIDE)
            except OSError as error:
                raise PreprocessError(f"segmentation model {self.settings.clipseg_model} cannot be loaded "
                                      f"({str(error).strip().splitlines()[0]})") from None
        return self.clipseg

    def super_resolution(self) -> SuperResolution | None:
        if self.settings.upscaler_model is None:
            return None
        if self.upscaler is None:
            try:
                self.upscaler = SuperResolution(self.settings.upscaler_model, self.device)
            except OSError as error:
                raise PreprocessError(f"super-resolution model {self.settings.upscaler_model} cannot be loaded "
                                      f"({str(error).strip().splitlines()[0]})") from None
        return self.upscaler


def crop_and_mask(root: Path, image_paths: list[Path], staging: Path, settings: PreprocessSettings,
                  device: torch.device) -> list[TrainingImage]:
    buckets = settings.buckets()
    if settings.mask_mode != "none":
        (staging / "masks").mkdir()
    decode_side = settings.resolution
    if settings.mask_mode == "face":  # small copies give the detector false faces (it finds one on monster/ at 360px)
        decode_side = max(decode_side, settings.detection_max_side * 3 // 4)
    done: list[TrainingImage] = []
    unusable: list[str] = []
    with ExitStack() as stack:
        models = PhotoModels(settings, device, stack)
        for path in tqdm(image_paths, desc="preprocessing", unit="image"):
            name = path.relative_to(root).as_posix()
            try:
                photo = load_photo(path, name, min_side=decode_side, max_pixels=settings.max_image_pixels)
            except ImageBombError as error:
                raise PreprocessError(str(error)) from None
            except UnreadableImageError as error:
                logger.warning("skipping %s", error)
                unusable.append(str(error))
                continue
            target = nearest_bucket(photo.image.size, buckets) if buckets else (settings.resolution,) * 2
            factor = crop_around(photo.image.size, target, centre_of(photo.image.size)).upscale_factor
            if factor > settings.max_upscale:
                reason = (f"{name}: {photo.image.size[0]}x{photo.image.size[1]} would be enlarged {factor:.1f}x to "
                          f"{target[0]}x{target[1]}, more than max_upscale={settings.max_upscale:g}")
                logger.warning("skipping %s", reason)
                unusable.append(reason)
                continue
            done.append(crop_one(photo, path, len(done), staging, settings, buckets, models))
    if not done:
        reasons = "; ".join(unusable[:MAX_REASONS_IN_ERROR])
        raise PreprocessError(f"none of the {len(image_paths)} images could be used: {reasons}")
    if unusable:
        logger.warning("%d of %d images were skipped (unreadable or too small)", len(unusable), len(image_paths))
    return done


def crop_one(photo: Photo, source: Path, index: int, staging: Path, settings: PreprocessSettings,
             buckets: list[tuple[int, int]], models: PhotoModels) -> TrainingImage:
    notes: list[str] = []
    mask, focus = models.mask_and_focus(photo, notes)
    size = photo.image.size
    target = nearest_bucket(size, buckets) if buckets else (settings.resolution, settings.resolution)
    crop = crop_around(size, target, focus if settings.crop_based_on_salience else centre_of(size))
    if buckets:
        notes.append(f"bucket {target[0]}x{target[1]}")
    super_resolution = models.super_resolution() if crop.upscaled else None
    if crop.upscaled:
        method = "super-resolution" if super_resolution else "Lanczos"
        notes.append(f"upscaled from {crop.width}x{crop.height} ({method})")
    stem = f"{index:04d}-{safe_stem(source.stem)}"
    image_file = f"images/{stem}.png"
    render_crop(photo.image, crop, super_resolution).save(staging / image_file, compress_level=PNG_COMPRESS_LEVEL)
    mask_file = None
    if mask is not None:
        mask_file = f"masks/{stem}.png"
        cut_mask(mask, crop).save(staging / mask_file, compress_level=PNG_COMPRESS_LEVEL)
    to_original = photo.original_size[0] / size[0]
    logger.info("%s: %dx%d, crop %dx%d at (%d, %d) -> %dx%d%s", photo.name, *photo.original_size,
                round(crop.width * to_original), round(crop.height * to_original), round(crop.left * to_original),
                round(crop.top * to_original), *target, f" [{', '.join(notes)}]" if notes else "")
    return TrainingImage(source=source, name=photo.name, image_file=image_file, mask_file=mask_file,
                         original_size=photo.original_size, crop=crop, notes=notes)


def safe_stem(stem: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem).strip("_")
    return cleaned[:40] or "image"


def log_concepts(items: list[TrainingImage]) -> None:
    by_folder: dict[Concept, int] = {}
    for item in items:
        by_folder[item.concept] = by_folder.get(item.concept, 0) + 1
    for concept, count in by_folder.items():
        if concept.folder:
            logger.info("concept folder %s: %d images, trigger %s, class %r, repeats %d", concept.folder, count,
                        concept.trigger or "-", concept.class_word, concept.repeats)


def collect_captions(root: Path, items: list[TrainingImage], other_paths: list[Path], staging: Path,
                     settings: PreprocessSettings, device: torch.device) -> dict[str, str]:
    """Captions by image name: sidecar files first, then caption tables, then the captioning model. A concept
    folder's images get its trigger word in their captions (given or generated) and its class word in generated
    ones; other images keep the caption they were given."""
    sources = [item.source for item in items]
    given = table_captions(root, sources, other_paths)
    given.update(sidecar_captions(sources))
    captions = {item.name: with_trigger(given[item.source], item.concept) for item in items if item.source in given}
    for item in items:
        caption = captions.get(item.name)
        if caption is not None and item.concept.trigger is None and settings.triggers and not any(
                word in caption for word in settings.triggers):
            logger.warning("%s: caption %r does not mention a trigger word (%s)", item.name, caption,
                           ", ".join(settings.triggers))
    missing = [item for item in items if item.name not in captions]
    if missing:
        captioner = load_captioner(settings.captioning_model, device, settings.caption_max_tokens)
        prefixes: dict[str, dict[str, Path]] = {}
        for item in missing:
            prefix = concept_prefix(settings.caption_prefix, settings.token_string, item.concept)
            prefixes.setdefault(prefix, {})[item.name] = staging / item.image_file
        for prefix, images in prefixes.items():
            captions.update(automatic_captions(captioner, images, prefix, settings.triggers,
                                               settings.caption_batch_size))
    return captions


def write_captions_csv(path: Path, items: list[TrainingImage], captions: dict[str, str]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CAPTIONS_HEADER)
        for item in items:
            crop_top, crop_left = item.crop.offset_at_target_scale()
            writer.writerow([item.image_file, item.mask_file or "", captions[item.name], *item.original_size,
                             crop_top, crop_left, *item.crop.target, item.concept.repeats,
                             item.concept.trigger or item.concept.class_word])


def sheet_entry(staging: Path, item: TrainingImage, caption: str) -> SheetEntry:
    label = item.name + (f" ({', '.join(item.notes)})" if item.notes else "")
    return SheetEntry(image=staging / item.image_file, mask=staging / item.mask_file if item.mask_file else None,
                      caption=caption, label=label)
