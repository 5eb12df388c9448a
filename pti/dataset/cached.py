"""The training tensors of every item, computed once: VAE latents (and flipped latents), latent-resolution masks,
SDXL micro-conditioning."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from pti.dataset.errors import DatasetError
from pti.dataset.folder import DatasetItem
from pti.dataset.triggers import TriggerWord, replace_trigger_words


def load_image(path: Path, size: int | None = None) -> Image.Image:
    """RGB image, EXIF-rotated; with ``size`` centre-cropped to a square and resized (plain-folder datasets)."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
    if size is not None and image.size != (size, size):
        image = ImageOps.fit(image, (size, size), Image.Resampling.LANCZOS)
    return image


MAX_HUE_SHIFT_DEGREES = 16.0  # kohya's color_aug: hue shifts up to 8 on OpenCV's 0-180 hue scale


def hue_shifted(image: Image.Image, degrees: float) -> Image.Image:
    """``image`` with every pixel's hue turned by ``degrees`` (saturation and value kept)."""
    hsv = np.asarray(image.convert("HSV")).astype(np.int32)
    hsv[..., 0] = (hsv[..., 0] + round(degrees / 360.0 * 256)) % 256
    return Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")


def hue_shifts(seed: int, index: int, copies: int) -> tuple[float, ...]:
    """The hue shifts of item ``index``'s colour copies: uniform in ±MAX_HUE_SHIFT_DEGREES, fixed by (seed, index)."""
    rng = np.random.default_rng([seed, index])
    return tuple(float(x) for x in rng.uniform(-MAX_HUE_SHIFT_DEGREES, MAX_HUE_SHIFT_DEGREES, copies))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """[3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def mask_to_latent_tensor(path: Path | None, image_size: tuple[int, int], latent_size: tuple[int, int]) -> torch.Tensor:
    """[1, h, w] loss weights in [0, 1] at latent resolution (all ones without a mask)."""
    if path is None:
        return torch.ones(1, *latent_size)
    with Image.open(path) as mask:
        mask = mask.convert("L")
        if mask.size != (image_size[1], image_size[0]):
            mask = mask.resize((image_size[1], image_size[0]), Image.Resampling.BILINEAR)
        weights = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]
    return F.interpolate(weights, size=latent_size, mode="area")[0]


@dataclass
class CachedItem:
    latents: torch.Tensor  # [4, h, w], scaled by the VAE's scaling factor
    flipped_latents: torch.Tensor | None
    mask: torch.Tensor  # [1, h, w]
    caption: str  # trigger words already replaced by new tokens
    time_ids: torch.Tensor  # [6]: original (h, w), crop (top, left), target (h, w)
    repeats: int = 1  # times the item is seen per epoch
    concept: str = ""  # the concept folder's word ("" outside concept folders)
    hue_shifts: tuple[float, ...] = ()  # colour augmentation: the hue turn of each copy, in degrees
    color_copies: list[tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=list)  # (latents, flipped)


class CachedDataset:
    """Every item's VAE latents (and horizontally flipped latents), mask and micro-conditioning, computed once."""

    def __init__(self, items: list[CachedItem]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    @classmethod
    @torch.no_grad()
    def build(cls, dataset: list[DatasetItem], vae, triggers: list[TriggerWord], *, resize_to: int | None,
              flip: bool, device: torch.device, dtype: torch.dtype, show_progress: bool = True,
              color_copies: int = 0, seed: int = 0) -> CachedDataset:
        """``color_copies``: colour augmentation done before caching, so the cached latents are those of the
        augmented pixels: each item is also encoded as that many hue-turned copies (:func:`hue_shifts`), and a
        sample draws the original or one copy."""
        from tqdm.auto import tqdm

        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        cached = []
        for index, item in enumerate(tqdm(dataset, desc="caching latents", disable=not show_progress)):
            image = load_image(item.image_path, resize_to)
            pixels = image_to_tensor(image)[None].to(device, dtype)
            height, width = pixels.shape[-2:]
            if height % factor or width % factor:
                raise DatasetError(f"{item.image_path.name}: size {width}x{height} is not a multiple of {factor}")
            latents = _encode(vae, pixels)
            flipped = _encode(vae, torch.flip(pixels, dims=[-1])) if flip else None
            cached.append(CachedItem(
                latents=latents,
                flipped_latents=flipped,
                mask=mask_to_latent_tensor(item.mask_path, (height, width),
                                           (height // factor, width // factor)).to(device),
                caption=replace_trigger_words(item.caption, triggers),
                time_ids=torch.tensor([*item.original_size, *item.crop_top_left, height, width],
                                      dtype=torch.float32, device=device),
                repeats=item.repeats,
                concept=item.concept,
            ))
            shifts = hue_shifts(seed, index, color_copies)
            for degrees in shifts:
                shifted = image_to_tensor(hue_shifted(image, degrees))[None].to(device, dtype)
                cached[-1].color_copies.append(
                    (_encode(vae, shifted), _encode(vae, torch.flip(shifted, dims=[-1])) if flip else None))
            cached[-1].hue_shifts = shifts
        return cls(cached)

    def batch(self, indices: list[int], flips: list[bool], colors: list[int] | None = None) -> dict:
        """Stack items ``indices`` (flipped where ``flips`` says so; ``colors``: 0 the original, k its k-th colour
        copy) into a training batch."""
        latents, masks = [], []
        for index, flip, color in zip(indices, flips, colors or [0] * len(indices)):
            item = self.items[index]
            use_flip = flip and item.flipped_latents is not None
            plain, flipped = (item.latents, item.flipped_latents) if color == 0 else item.color_copies[color - 1]
            latents.append(flipped if use_flip else plain)
            masks.append(torch.flip(item.mask, dims=[-1]) if use_flip else item.mask)
        return {
            "latents": torch.stack(latents),
            "masks": torch.stack(masks),
            "captions": [self.items[i].caption for i in indices],
            "time_ids": torch.stack([self.items[i].time_ids for i in indices]),
        }


def _encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    latents = vae.encode(pixels).latent_dist.mean
    return (latents * vae.config.scaling_factor)[0].float()  # stays on the training device
