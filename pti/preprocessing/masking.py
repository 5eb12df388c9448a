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


@dataclass(frozen=True)
class FaceSearch:
    """How hard the face masker looks. Mediapipe's detectors miss faces rolled far from upright (a head bowed and
    turned aside, a photo stored sideways), so the photo is also turned before detecting, and the first turn with a
    face wins. Turning also multiplies the detectors' false faces (a coffee cup, a knitted toy), so a detection counts
    only if the face mesh finds a face on a crop around it or the detector is sure enough; profiles, which the mesh
    rarely finds, pass on their score. The upright photo, the likeliest pose, asks less than turned copies."""

    turns: tuple[float, ...] = (0.0, 30.0, -30.0, 60.0, -60.0, 90.0, -90.0, 180.0)  # degrees anticlockwise, in order
    sure_score_upright: float = 0.7
    sure_score_turned: float = 0.8

    def sure_score(self, degrees: float) -> float:
        return self.sure_score_upright if degrees == 0 else self.sure_score_turned


@dataclass(frozen=True)
class Turn:
    """The photo turned `degrees` counter-clockwise about its centre onto a canvas that holds all of it, as PIL's
    rotate(expand=True) does; maps turned-canvas points back to photo points."""

    degrees: float
    width: int
    height: int

    def turned(self, image: Image.Image) -> np.ndarray:
        if self.degrees == 0:
            return np.asarray(image)
        return np.asarray(image.rotate(self.degrees, Image.Resampling.BILINEAR, expand=True))

    def to_photo(self, x: float, y: float, canvas: tuple[int, int]) -> tuple[float, float]:
        if self.degrees == 0:
            return x, y
        angle = math.radians(self.degrees)
        dx, dy = x - canvas[0] / 2, y - canvas[1] / 2
        return (self.width / 2 + math.cos(angle) * dx - math.sin(angle) * dy,
                self.height / 2 + math.sin(angle) * dx + math.cos(angle) * dy)

    def box_to_photo(self, box: FaceBox, canvas: tuple[int, int]) -> FaceBox:
        corners = [self.to_photo(x, y, canvas) for x in (box.left, box.right) for y in (box.top, box.bottom)]
        xs, ys = [x for x, _ in corners], [y for _, y in corners]
        return FaceBox(max(0.0, min(xs)), max(0.0, min(ys)), min(float(self.width), max(xs)),
                       min(float(self.height), max(ys)))


@dataclass(frozen=True)
class FoundFace:
    face: FaceBox  # photo (detection copy) coordinates
    ellipse: list[tuple[float, float]]  # the detection box's inscribed ellipse, grown, photo coordinates
    outline: list[tuple[float, float]] | None  # the mesh's face oval, photo coordinates; None when the mesh failed
    turn: float  # degrees the photo was turned when the face was found


class FaceMasker:
    """Mediapipe's bundled full- and short-range face detectors plus face mesh, on the photo and on turned copies of
    it (see FaceSearch); works offline. Use as a context manager: the graphs hold native resources."""

    def __init__(self, detection_max_side: int, floor: float, search: FaceSearch = FaceSearch()) -> None:
        from mediapipe.python.solutions import face_detection, face_mesh

        self.detection_max_side = detection_max_side
        self.floor = floor
        self.search = search
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
        found = self.find_face(small)
        if found is None:
            return None
        mask_small = Image.new("L", small.size, 0)
        draw = ImageDraw.Draw(mask_small)
        draw.polygon(found.ellipse, fill=255)  # the mesh's oval of a face seen from the side can be a thin crescent
        if found.outline is not None:
            draw.polygon(grown_polygon(found.outline, FACE_OVAL_GROWTH), fill=255)
        radius = max(1.0, FEATHER_FRACTION * (found.face.right - found.face.left))
        mask_small = mask_small.filter(ImageFilter.GaussianBlur(radius))
        mask = mask_small.resize(photo.size, Image.Resampling.BILINEAR) if factor != 1.0 else mask_small
        return FaceMask(mask=apply_floor(mask, self.floor), face=found.face.scaled(1 / factor),
                        from_mesh=found.outline is not None)

    def find_face(self, image: Image.Image) -> FoundFace | None:
        """The largest face that counts (see FaceSearch) on the first turn of the photo that has one."""
        for degrees in self.search.turns:
            turn = Turn(degrees, image.width, image.height)
            pixels = turn.turned(image)
            canvas = (pixels.shape[1], pixels.shape[0])
            for box, score in sorted(self.detections(pixels), key=lambda found: found[0].area, reverse=True):
                outline = self.face_outline(pixels, box)
                if outline is None and score < self.search.sure_score(degrees):
                    continue
                photo_outline = None if outline is None else [turn.to_photo(x, y, canvas) for x, y in outline]
                ellipse = [turn.to_photo(x, y, canvas) for x, y in ellipse_points(box, FACE_OVAL_GROWTH)]
                return FoundFace(turn.box_to_photo(box, canvas), ellipse, photo_outline, degrees)
        return None

    def detections(self, pixels: np.ndarray) -> list[tuple[FaceBox, float]]:
        """Every face either detector finds, with its score."""
        height, width = pixels.shape[:2]
        return [(relative_box_to_pixels(found.location_data.relative_bounding_box, width, height), found.score[0])
                for detector in self.detectors for found in detector.process(pixels).detections or []]

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


def ellipse_points(face: FaceBox, growth: float, count: int = 48) -> list[tuple[float, float]]:
    """Points around the box's inscribed ellipse, grown about its centre; a polygon, so it can be turned."""
    cx, cy = face.centre
    half_w, half_h = (face.right - face.left) / 2 * growth, (face.bottom - face.top) / 2 * growth
    return [(cx + half_w * math.cos(2 * math.pi * k / count), cy + half_h * math.sin(2 * math.pi * k / count))
            for k in range(count)]


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
