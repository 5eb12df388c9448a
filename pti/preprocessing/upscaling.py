"""Optional super-resolution for photos smaller than the training size (Swin2SR through transformers)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from pti.preprocessing.cropping import Crop, cut


class SuperResolution:
    """A Swin2SR model loaded by id or folder, e.g. `caidas/swin2SR-classical-sr-x2-64`."""

    def __init__(self, model_id: str, device: torch.device) -> None:
        from transformers import Swin2SRForImageSuperResolution, Swin2SRImageProcessor

        self.processor = Swin2SRImageProcessor.from_pretrained(model_id)
        self.model = Swin2SRForImageSuperResolution.from_pretrained(model_id).to(device).eval()
        self.device = device
        self.scale = int(self.model.config.upscale)

    @torch.inference_mode()
    def upscale(self, image: Image.Image) -> Image.Image:
        inputs = self.processor(image, return_tensors="pt").to(self.device)
        output = self.model(**inputs).reconstruction.float()
        height, width = image.height * self.scale, image.width * self.scale  # drop the padding to the window size
        pixels = output[0, :, :height, :width].clamp(0, 1).permute(1, 2, 0).cpu().numpy()
        return Image.fromarray((pixels * 255).round().astype(np.uint8))


def render_crop(image: Image.Image, crop: Crop, super_resolution: SuperResolution | None) -> Image.Image:
    """The training image for `crop`: super-resolved first when the crop is smaller than its target and a model is
    configured, then resized to the target with Lanczos."""
    if super_resolution is None or not crop.upscaled:
        return cut(image, crop)
    enlarged = super_resolution.upscale(image.crop(crop.box))
    return enlarged.resize(crop.target, Image.Resampling.LANCZOS)
