"""Loss-weight masks for training photos: a soft mask over the largest face (mediapipe), or a text-prompted CLIPSeg
mask. Both work on a downscaled copy of the photo and return a mode "L" mask at the photo's size."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

logger = logging.getLogger(__name__)

FACE_OVAL_GROWTH = 1.1  # the mesh's face oval stops at the hairline and jaw; grow it a little before feathering
FEATHER_FRACTION = 0.08  # blur radius as a fraction of the face's width
MESH_CONTEXT = 1.0  # face-box widths of context on each side of the face when running the mesh on a crop
MIN_DETECTION_CONFIDENCE = 0.5


@dataclass(frozen=True)
class FaceBox:
    """A face in photo pixel coordinates."""

    left: float
    top: float
    right: float
    bottom: float

    @property
    def area(self) -> float:
        return max(self.right - self.left, 0.0) * max(self.bottom - self.top, 0.0)

    @property
    def centre(self) -> tuple[float, float]:
        return (self.left + self.right) / 2, (self.top + self.bottom) / 2

    def scaled(self, factor: float) -> FaceBox:
        return FaceBox(self.left * factor, self.top * factor, self.right * factor, self.bottom * factor)


@dataclass(frozen=True)
class FaceMask:
    mask: Image.Image  # mode "L", the photo's size
    face: FaceBox  # the largest face, photo pixel coordinates
    from_mesh: bool  # False when the mesh failed and the mask is an ellipse over the detection box


def downscaled(image: Image.Image, max_side: int) -> tuple[Image.Image, float]:
    """A copy no larger than `max_side` on its long side, and the factor from photo to copy coordinates."""
    factor = min(1.0, max_side / max(image.size))
    if factor == 1.0:
        return image, 1.0
    size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0), factor


def apply_floor(mask: Image.Image, floor: float) -> Image.Image:
    """Raise every weight to at least `floor`, so the rest of the photo still counts a little."""
    low = round(floor * 255)
    return mask.point(lambda value: max(value, low))


class FaceMasker:
    """Mediapipe's bundled short- and full-range face detectors plus face mesh; works offline. Use as a context
    manager: the graphs hold native resources."""

    def __init__(self, detection_max_side: int, floor: float) -> None:
        from mediapipe.python.solutions import face_detection, face_mesh

        self.detection_max_side = detection_max_side
        self.floor = floor
        self.detectors = [face_detection.FaceDetection(model_selection=selection,
                                                       min_detection_confidence=MIN_DETECTION_CONFIDENCE)
                          for selection in (1, 0)]  # full range (people further away) first, then close-up
        self.mesh = face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=False,
                                       min_detection_confidence=MIN_DETECTION_CONFIDENCE)
        self.oval_indices = sorted({index for edge in face_mesh.FACEMESH_FACE_OVAL for index in edge})

    def __enter__(self) -> FaceMasker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for graph in [*self.detectors, self.mesh]:
            graph.close()

    def face_mask(self, photo: Image.Image) -> FaceMask | None:
        """A feathered mask over the largest face, or None when no face is found."""
        small, factor = downscaled(photo, self.detection_max_side)
        pixels = np.asarray(small)
        face = self.largest_face(pixels)
        if face is None:
            return None
        outline = self.face_outline(pixels, face)
        mask_small = Image.new("L", small.size, 0)
        draw = ImageDraw.Draw(mask_small)
        if outline is not None:
            draw.polygon(grown_polygon(outline, FACE_OVAL_GROWTH), fill=255)
        else:
            draw.ellipse(grown_box(face, FACE_OVAL_GROWTH), fill=255)
        radius = max(1.0, FEATHER_FRACTION * (face.right - face.left))
        mask_small = mask_small.filter(ImageFilter.GaussianBlur(radius))
        mask = mask_small.resize(photo.size, Image.Resampling.BILINEAR) if factor != 1.0 else mask_small
        return FaceMask(mask=apply_floor(mask, self.floor), face=face.scaled(1 / factor), from_mesh=outline is not None)

    def largest_face(self, pixels: np.ndarray) -> FaceBox | None:
        height, width = pixels.shape[:2]
        for detector in self.detectors:
            detections = detector.process(pixels).detections or []
            boxes = [relative_box_to_pixels(d.location_data.relative_bounding_box, width, height) for d in detections]
            if boxes:
                return max(boxes, key=lambda box: box.area)
        return None

    def face_outline(self, pixels: np.ndarray, face: FaceBox) -> list[tuple[float, float]] | None:
        """The face-mesh oval of `face`, found on a crop around it so the mesh cannot pick another face."""
        height, width = pixels.shape[:2]
        margin = MESH_CONTEXT * max(face.right - face.left, face.bottom - face.top)
        left, top = max(0, int(face.left - margin)), max(0, int(face.top - margin))
        right, bottom = min(width, int(face.right + margin)), min(height, int(face.bottom + margin))
        crop = np.ascontiguousarray(pixels[top:bottom, left:right])
        found = self.mesh.process(crop).multi_face_landmarks
        if not found:
            return None
        landmarks = found[0].landmark
        crop_h, crop_w = crop.shape[:2]
        return [(left + landmarks[i].x * crop_w, top + landmarks[i].y * crop_h) for i in self.oval_indices]


def relative_box_to_pixels(box, width: int, height: int) -> FaceBox:
    left, top = max(0.0, box.xmin * width), max(0.0, box.ymin * height)
    right = min(float(width), (box.xmin + box.width) * width)
    bottom = min(float(height), (box.ymin + box.height) * height)
    return FaceBox(left, top, right, bottom)


def grown_polygon(points: list[tuple[float, float]], growth: float) -> list[tuple[float, float]]:
    """The points ordered around their centroid (the oval's edges come unordered) and pushed outwards."""
    cx = sum(x for x, _ in points) / len(points)
    cy = sum(y for _, y in points) / len(points)
    ordered = sorted(points, key=lambda p: math.atan2(p[1] - cy, p[0] - cx))
    return [(cx + (x - cx) * growth, cy + (y - cy) * growth) for x, y in ordered]


def grown_box(face: FaceBox, growth: float) -> tuple[float, float, float, float]:
    cx, cy = face.centre
    half_w, half_h = (face.right - face.left) / 2 * growth, (face.bottom - face.top) / 2 * growth
    return cx - half_w, cy - half_h, cx + half_w, cy + half_h


class ClipSegMasker:
    """CLIPSeg masks for a text prompt, as cog-sdxl makes them: softmax of the prompt's logits against an empty
    prompt's, sharpened by `temperature`, raised to the floor and normalised so the strongest pixel weighs 1."""

    def __init__(self, model_id: str, temperature: float, floor: float, device: torch.device,
                 max_side: int) -> None:
        from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

        self.processor = CLIPSegProcessor.from_pretrained(model_id)
        self.model = CLIPSegForImageSegmentation.from_pretrained(model_id).to(device).eval()
        self.device = device
        self.temperature = temperature
        self.floor = floor
        self.max_side = max_side

    @torch.inference_mode()
    def prompt_mask(self, photo: Image.Image, prompt: str) -> Image.Image:
        small, _ = downscaled(photo, self.max_side)
        inputs = self.processor(text=[prompt, ""], images=[small, small], padding=True, return_tensors="pt")
        logits = self.model(**inputs.to(self.device)).logits.float()
        probs = torch.softmax(logits / self.temperature, dim=0)[0]
        probs = (probs + self.floor).clamp(0, 1)
        probs = probs / probs.max()
        mask = Image.fromarray((probs.cpu().numpy() * 255).round().astype(np.uint8))
        return mask.resize(photo.size, Image.Resampling.BILINEAR)
