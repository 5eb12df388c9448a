"""SDXL image generation for the predictor: txt2img, img2img and inpaint pipelines over one set of components,
the refiner (sharing the base's VAE and second text encoder, loaded on the first request that asks for it),
schedulers by name, the safety checker, the invisible watermark, and writing the images as webp/jpg/png.

Every call starts from the same state: the shared VAE back in its loaded dtype (diffusers' img2img/inpaint upcast
it to float32 and back, and an exception in between would leave it float32), VAE slicing/tiling on only when the
request's images would not fit in free memory otherwise.

Nothing here knows about Cog; :mod:`predict` turns Cog inputs into a :class:`GenerationRequest`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UniPCMultistepScheduler,
)
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.pipelines.stable_diffusion_xl.watermark import StableDiffusionXLWatermarker
from PIL import Image, UnidentifiedImageError
from transformers import CLIPImageProcessor

from pti.inference.prompts import GuidancePair, encode_pair
from pti.models.base_model import (
    MINI_WORLD,
    TINY,
    Runtime,
    allow_tf32,
    free_bytes,
    load_sdxl_pipeline,
    model_spec,
    pick_runtime,
    pretrained_kwargs,
    resolve_source,
)

logger = logging.getLogger(__name__)

REFINER_MODEL = "stabilityai/stable-diffusion-xl-refiner-1.0"
SAFETY_CHECKER_MODEL = "CompVis/stable-diffusion-safety-checker"
FEATURE_EXTRACTOR_MODEL = "openai/clip-vit-base-patch32"

SCHEDULERS: dict[str, Callable[[dict], object]] = {
    "DDIM": DDIMScheduler.from_config,
    "DPMSolverMultistep": DPMSolverMultistepScheduler.from_config,
    "HeunDiscrete": HeunDiscreteScheduler.from_config,
    "KarrasDPM": lambda config: DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True),
    "K_EULER_ANCESTRAL": EulerAncestralDiscreteScheduler.from_config,
    "K_EULER": EulerDiscreteScheduler.from_config,
    "PNDM": PNDMScheduler.from_config,
    "DPM++2MKarras": lambda config: DPMSolverMultistepScheduler.from_config(
        config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True),
    "DPM++2MSDEKarras": lambda config: DPMSolverMultistepScheduler.from_config(
        config, algorithm_type="sde-dpmsolver++", solver_order=2, use_karras_sigmas=True),
    "UniPC": UniPCMultistepScheduler.from_config,
}
MIN_STEPS = {"PNDM": 4}  # PNDM's Runge-Kutta warm-up needs this many steps
REFINE_MODES = ("no_refiner", "expert_ensemble_refiner", "base_image_refiner")
OUTPUT_FORMATS = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}
MAX_OUTPUTS = 4
# Output sides (txt2img, inpaint): multiples of 8, the VAE's factor (diffusers refuses others, so cog-sdxl failed on
# them; refused here too, naming the input, rather than rounded behind the client's back), 64 to 2048 (twice SDXL's
# native 1024). img2img keeps the input image's size, as in cog-sdxl, and does not use width and height.
IMAGE_SIDE_MULTIPLE = 8
MIN_IMAGE_SIDE = 64
MAX_IMAGE_SIDE = 2048
# torch.Generator.manual_seed takes these (a negative seed counts modulo 2**64, as in cog-sdxl)
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1
REFINER_STRENGTH = 0.3  # how much of the schedule base_image_refiner re-runs (the refiner pipeline's default)
# Peak bytes of the VAE decoder per output pixel and per byte of its dtype (the 128/256-channel feature maps at full
# resolution, a few alive at once): ≈1 GiB per 1024² image in half precision. Slicing decodes one image at a time;
# tiling decodes overlapping tiles (slightly different pixels at the seams: used only when one image does not fit).
VAE_DECODE_BYTES_PER_PIXEL_PER_ELEMENT_BYTE = 512


class GenerationInputError(ValueError):
    """A generation input is invalid; the message is one line naming the input."""


class NSFWError(ValueError):
    """Every image of the request was flagged by the safety checker."""


class ModelUnavailableError(RuntimeError):
    """A model a request needs (the refiner, loaded on first use) cannot be loaded here; one line."""


@dataclass(frozen=True)
class ModelSettings:
    """Which models the predictor loads (env ``SDXL_MODEL``, ``SDXL_REFINER_MODEL``, ``SAFETY_CHECKER_MODEL``,
    ``FEATURE_EXTRACTOR_MODEL``, ``SDXL_PRECISION``). With the tiny base, the refiner and the safety checker
    default to tiny models of their real classes."""

    base_model: str
    refiner_model: str
    safety_checker_model: str
    feature_extractor_model: str
    precision: str = "auto"
    max_image_side: int = MAX_IMAGE_SIDE
    min_image_side: int = MIN_IMAGE_SIDE

    @classmethod
    def from_env(cls) -> ModelSettings:
        base = model_spec()
        tiny = base in (TINY, MINI_WORLD)  # offline bases: the tiny refiner and safety checker stand in
        return cls(
            base_model=base,
            refiner_model=os.environ.get("SDXL_REFINER_MODEL") or (TINY if tiny else REFINER_MODEL),
            safety_checker_model=os.environ.get("SAFETY_CHECKER_MODEL") or (TINY if tiny else SAFETY_CHECKER_MODEL),
            feature_extractor_model=os.environ.get("FEATURE_EXTRACTOR_MODEL")
            or (TINY if tiny else FEATURE_EXTRACTOR_MODEL),
            precision=os.environ.get("SDXL_PRECISION") or "auto",
        )


@dataclass(frozen=True)
class GenerationRequest:
    """One prediction's generation inputs (replicate/cog-sdxl names and meanings)."""

    prompt: str
    negative_prompt: str
    image: Path | None
    mask: Path | None
    width: int
    height: int
    num_outputs: int
    scheduler: str
    num_inference_steps: int
    guidance_scale: float
    prompt_strength: float
    seed: int
    refine: str
    high_noise_frac: float
    refine_steps: int | None
    apply_watermark: bool
    disable_safety_checker: bool
    output_format: str
    output_quality: int

    @property
    def mode(self) -> str:
        if self.image is not None and self.mask is not None:
            return "inpaint"
        return "img2img" if self.image is not None else "txt2img"


@dataclass
class SDXLModels:
    """The loaded models. ``txt2img``, ``img2img`` and ``inpaint`` share every component object; the refiner
    (needed by two of the three refine modes) loads on the first request that asks for it (:meth:`refiner`)."""

    runtime: Runtime
    settings: ModelSettings
    txt2img: StableDiffusionXLPipeline
    img2img: StableDiffusionXLImg2ImgPipeline
    inpaint: StableDiffusionXLInpaintPipeline
    safety_checker: StableDiffusionSafetyChecker
    feature_extractor: CLIPImageProcessor
    watermarker: StableDiffusionXLWatermarker
    scheduler_config: dict
    vae_dtype: torch.dtype  # the shared VAE's dtype as loaded; every call starts from it
    loaded_refiner: StableDiffusionXLImg2ImgPipeline | None = None
    refiner_scheduler_config: dict | None = None
    _refiner_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def text_pipelines(self) -> list:
        """Every pipeline that tokenizes prompts, the base first (trained weights swap tokenizers on all). The
        refiner, loaded later, takes the base's current second tokenizer on each call."""
        return [self.txt2img, self.img2img, self.inpaint]

    def refiner(self) -> StableDiffusionXLImg2ImgPipeline:
        """The refiner, loaded on first use (sharing the base's VAE and second text encoder)."""
        with self._refiner_lock:
            if self.loaded_refiner is None:
                try:
                    refiner = _load_refiner(self.settings.refiner_model, self.txt2img, self.runtime)
                except OSError as error:
                    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
                    raise ModelUnavailableError(
                        f"the refine modes need the refiner {self.settings.refiner_model}, which cannot be loaded "
                        f"here ({reason}); download it into the weights folder (scripts/download_weights.py "
                        "--only refiner) or use refine=no_refiner") from None
                refiner.set_progress_bar_config(disable=True)
                self.refiner_scheduler_config = dict(refiner.scheduler.config)
                self.loaded_refiner = refiner
            self.loaded_refiner.tokenizer_2 = self.txt2img.tokenizer_2  # the active trained weights' tokens
            return self.loaded_refiner


def load_models(settings: ModelSettings, runtime: Runtime | None = None) -> SDXLModels:
    """Load the base pipeline, build img2img/inpaint on its components, and load the safety checker (the refiner
    loads on first use)."""
    runtime = runtime or pick_runtime(settings.precision)
    allow_tf32(runtime.device)
    txt2img = load_sdxl_pipeline(settings.base_model, runtime)
    components = txt2img.components
    img2img = StableDiffusionXLImg2ImgPipeline(**components)
    inpaint = StableDiffusionXLInpaintPipeline(**components)
    safety_checker, feature_extractor = _load_safety_checker(settings, runtime)
    for pipe in (img2img, inpaint):
        pipe.set_progress_bar_config(disable=True)
    return SDXLModels(
        runtime=runtime, settings=settings, txt2img=txt2img, img2img=img2img, inpaint=inpaint,
        safety_checker=safety_checker, feature_extractor=feature_extractor,
        watermarker=StableDiffusionXLWatermarker(), scheduler_config=dict(txt2img.scheduler.config),
        vae_dtype=txt2img.vae.dtype,
    )


def _load_refiner(spec: str, base: StableDiffusionXLPipeline, runtime: Runtime) -> StableDiffusionXLImg2ImgPipeline:
    source: Path | str
    if spec == TINY:
        from pti.models.tiny_models import ensure_tiny_refiner

        source = ensure_tiny_refiner()
    else:
        source = resolve_source(spec) if not Path(spec).expanduser().is_dir() else Path(spec).expanduser()
    kwargs = pretrained_kwargs(source, runtime)
    if runtime.device.type != "cuda":
        kwargs["dtype"] = torch.float32
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        source, vae=base.vae, text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2, **kwargs)
    return refiner.to(runtime.device)


def _load_safety_checker(settings: ModelSettings, runtime: Runtime) -> tuple[StableDiffusionSafetyChecker,
                                                                             CLIPImageProcessor]:
    checker_source: Path | str = settings.safety_checker_model
    extractor_source: Path | str = settings.feature_extractor_model
    checker_folder = extractor_folder = None
    if TINY in (checker_source, extractor_source):
        from pti.models.tiny_models import ensure_tiny_safety_checker

        tiny = ensure_tiny_safety_checker()
        checker_folder, extractor_folder = tiny / "safety_checker", tiny / "feature_extractor"
    checker = StableDiffusionSafetyChecker.from_pretrained(
        checker_folder if checker_source == TINY else _local_first(checker_source),
        dtype=runtime.dtype if runtime.device.type == "cuda" else torch.float32)
    extractor = CLIPImageProcessor.from_pretrained(
        extractor_folder if extractor_source == TINY else _local_first(extractor_source))
    return checker.to(runtime.device), extractor


def _local_first(spec: Path | str) -> Path | str:
    """A folder as given; a hub repo id through the weights folder's copy when there is one."""
    if Path(spec).expanduser().is_dir():
        return Path(spec).expanduser()
    return resolve_source(str(spec))


# ---------------------------------------------------------------------------------------------- validation


def validate_request(request: GenerationRequest, settings: ModelSettings) -> None:
    """Refuse invalid inputs with a one-line :class:`GenerationInputError`."""
    if request.mode != "img2img":  # img2img draws at the input image's size: width and height are not used
        for name, value in (("width", request.width), ("height", request.height)):
            check_image_side(name, value, settings)
    if request.mask is not None and request.image is None:
        raise GenerationInputError("mask: given without image (inpainting needs both)")
    if not 1 <= request.num_outputs <= MAX_OUTPUTS:
        raise GenerationInputError(f"num_outputs={request.num_outputs} is outside 1..{MAX_OUTPUTS}")
    if request.scheduler not in SCHEDULERS:
        raise GenerationInputError(f"scheduler={request.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    if request.refine not in REFINE_MODES:
        raise GenerationInputError(f"refine={request.refine!r} is not one of {', '.join(REFINE_MODES)}")
    if request.output_format not in OUTPUT_FORMATS:
        raise GenerationInputError(f"output_format={request.output_format!r} is not one of "
                                   f"{', '.join(OUTPUT_FORMATS)}")
    ranges = (("num_inference_steps", request.num_inference_steps, 1, 500),
              ("guidance_scale", request.guidance_scale, 1, 50), ("prompt_strength", request.prompt_strength, 0, 1),
              ("high_noise_frac", request.high_noise_frac, 0, 1), ("output_quality", request.output_quality, 0, 100))
    for name, value, low, high in ranges:
        if not low <= value <= high:
            raise GenerationInputError(f"{name}={value} is outside {low}..{high}")
    min_steps = MIN_STEPS.get(request.scheduler, 1)
    if request.num_inference_steps < min_steps:
        raise GenerationInputError(f"scheduler={request.scheduler} needs num_inference_steps >= {min_steps}, got "
                                   f"{request.num_inference_steps}")
    if not MIN_SEED <= request.seed <= MAX_SEED:
        raise GenerationInputError(f"seed={request.seed} is outside {MIN_SEED}..{MAX_SEED}")
    if request.refine_steps is not None and request.refine_steps < 1:
        raise GenerationInputError(f"refine_steps={request.refine_steps} must be at least 1")
    if request.mode != "txt2img" and int(request.num_inference_steps * request.prompt_strength) < 1:
        raise GenerationInputError(f"prompt_strength={request.prompt_strength} with num_inference_steps="
                                   f"{request.num_inference_steps} leaves no denoising step; raise either")
    refine_steps = request.refine_steps or request.num_inference_steps
    if request.refine == "base_image_refiner" and int(refine_steps * REFINER_STRENGTH) < 1:
        field = "refine_steps" if request.refine_steps is not None else "num_inference_steps"
        raise GenerationInputError(f"{field}={refine_steps} gives base_image_refiner no step (it runs "
                                   f"{REFINER_STRENGTH} of refine_steps, which default to num_inference_steps); set "
                                   f"refine_steps to at least {int(1 / REFINER_STRENGTH) + 1}")


def check_image_side(name: str, value: int, settings: ModelSettings) -> None:
    """``value`` as the output's ``name`` (width or height), or a one-line error naming it and what would do."""
    if not settings.min_image_side <= value <= settings.max_image_side:
        raise GenerationInputError(
            f"{name}={value} is outside {settings.min_image_side}..{settings.max_image_side} pixels")
    if value % IMAGE_SIDE_MULTIPLE:
        below = value - value % IMAGE_SIDE_MULTIPLE  # the bounds are multiples too: both neighbours are in range
        raise GenerationInputError(f"{name}={value} is not a multiple of {IMAGE_SIDE_MULTIPLE}; the nearest are "
                                   f"{below} and {below + IMAGE_SIDE_MULTIPLE}")


def load_input_image(path: Path, what: str, mode: str = "RGB") -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert(mode)
    except (UnidentifiedImageError, OSError) as error:
        raise GenerationInputError(f"{what}: {Path(path).name} is not a readable image ({error})") from None


# ---------------------------------------------------------------------------------------------- generation


def _set_call_state(pipe, models: SDXLModels, scheduler: str, apply_watermark: bool, config: dict) -> None:
    """Per-call pipeline state, set explicitly on every call so nothing leaks from one prediction to the next."""
    pipe.scheduler = SCHEDULERS[scheduler](config)
    pipe.watermark = models.watermarker if apply_watermark else None


def restore_shared_state(models: SDXLModels) -> None:
    """Undo what an interrupted call may have left on the shared components: diffusers' img2img/inpaint
    ``prepare_latents`` upcast the VAE to float32 and cast it back afterwards, so an exception (an out-of-memory
    error) in between leaves it float32 for every later call."""
    if models.txt2img.vae.dtype != models.vae_dtype:
        logger.warning("VAE found in %s after an interrupted call; back to %s", models.txt2img.vae.dtype,
                       models.vae_dtype)
        models.txt2img.vae.to(dtype=models.vae_dtype)


def vae_decode_bytes(width: int, height: int, dtype: torch.dtype) -> int:
    """Estimated peak bytes of decoding one ``width`` x ``height`` image with the VAE in ``dtype``."""
    element = torch.tensor([], dtype=dtype).element_size()
    return width * height * element * VAE_DECODE_BYTES_PER_PIXEL_PER_ELEMENT_BYTE


@dataclass(frozen=True)
class DecodePlan:
    slicing: bool  # decode one image at a time (same pixels)
    tiling: bool  # decode in tiles (one image alone would not fit)


def plan_vae_decode(width: int, height: int, num_images: int, dtype: torch.dtype, free: int) -> DecodePlan:
    """Slicing when the request's images decoded together would not fit in ``free`` bytes, tiling when one
    would not; neither otherwise (the fastest decode, and tiling changes pixels)."""
    one = vae_decode_bytes(width, height, dtype)
    return DecodePlan(slicing=one * num_images > free, tiling=one > free)


def configure_vae_decode(models: SDXLModels, width: int, height: int, num_images: int) -> DecodePlan:
    vae = models.txt2img.vae
    plan = plan_vae_decode(width, height, num_images, models.vae_dtype, free_bytes(models.runtime.device))
    vae.enable_slicing() if plan.slicing else vae.disable_slicing()
    vae.enable_tiling() if plan.tiling else vae.disable_tiling()
    if plan.slicing or plan.tiling:
        logger.info("VAE decode of %d image(s) at %dx%d: slicing=%s tiling=%s (free memory)", num_images, width,
                    height, plan.slicing, plan.tiling)
    return plan


def capped_input_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """An img2img input's working size: scaled down (aspect kept) so no side exceeds ``max_side``, and rounded
    down to multiples of 8 (the VAE's factor)."""
    width, height = size
    scale = min(1.0, max_side / max(width, height))
    return tuple(max(8, int(side * scale) // 8 * 8) for side in (width, height))


def cap_input_image(image: Image.Image, settings: ModelSettings) -> Image.Image:
    """The img2img input at its capped size (an unbounded upload would run out of memory in the VAE)."""
    size = capped_input_size(image.size, settings.max_image_side)
    if size == image.size:
        return image
    logger.info("img2img input resized from %dx%d to %dx%d", *image.size, *size)
    return image.resize(size, Image.Resampling.LANCZOS)


def generate(models: SDXLModels, request: GenerationRequest, prompt: str) -> list[Image.Image]:
    """Run the request (``prompt`` is the prompt with trigger words already expanded); return PIL images."""
    restore_shared_state(models)
    pipe, kwargs = _mode_pipeline(models, request)
    width, height = kwargs["image"].size if request.mode == "img2img" else (request.width, request.height)
    configure_vae_decode(models, width, height, request.num_outputs)
    refine = request.refine != "no_refiner"
    refiner = models.refiner() if refine else None
    _set_call_state(pipe, models, request.scheduler, request.apply_watermark and not refine, models.scheduler_config)
    generator = models.runtime.generator(request.seed)
    common = dict(num_images_per_prompt=request.num_outputs, guidance_scale=request.guidance_scale,
                  generator=generator, num_inference_steps=request.num_inference_steps)
    if request.refine == "expert_ensemble_refiner":
        kwargs.update(output_type="latent", denoising_end=request.high_noise_frac)
    elif request.refine == "base_image_refiner":
        kwargs.update(output_type="latent")
    with torch.inference_mode():
        images = pipe(**common, **kwargs, **base_conditioning(models, pipe, prompt, request).as_kwargs()).images
        if not refine:
            return images
        _set_call_state(refiner, models, request.scheduler, request.apply_watermark,
                        models.refiner_scheduler_config)
        refiner_kwargs: dict = {"image": images}
        if request.refine == "expert_ensemble_refiner":
            refiner_kwargs["denoising_start"] = request.high_noise_frac
        else:
            refiner_kwargs["strength"] = REFINER_STRENGTH
            common["num_inference_steps"] = request.refine_steps or request.num_inference_steps
        return refiner(**common, **refiner_kwargs,
                       **refiner_conditioning(models, refiner, prompt, request).as_kwargs()).images


def base_conditioning(models: SDXLModels, pipe, prompt: str, request: GenerationRequest) -> GuidancePair:
    """The base pipeline's conditioning: both encoders, through the base's current tokenizers (which know the
    active trained weights' tokens); A1111 weights and chunks of any length."""
    base = models.txt2img
    return encode_pair(prompt, request.negative_prompt, [base.tokenizer, base.tokenizer_2],
                       [base.text_encoder, base.text_encoder_2], pipe.config.force_zeros_for_empty_prompt)


def refiner_conditioning(models: SDXLModels, refiner, prompt: str, request: GenerationRequest) -> GuidancePair:
    """The refiner's conditioning: its one encoder (the base's CLIP-G) through the base's current second
    tokenizer."""
    return encode_pair(prompt, request.negative_prompt, [models.txt2img.tokenizer_2], [refiner.text_encoder_2],
                       refiner.config.force_zeros_for_empty_prompt)


def _mode_pipeline(models: SDXLModels, request: GenerationRequest) -> tuple[object, dict]:
    if request.mode == "inpaint":
        return models.inpaint, dict(image=load_input_image(request.image, "image"),
                                    mask_image=load_input_image(request.mask, "mask", "L"),
                                    strength=request.prompt_strength, width=request.width, height=request.height)
    if request.mode == "img2img":
        # Like cog-sdxl: img2img keeps the input image's size.
        image = cap_input_image(load_input_image(request.image, "image"), models.settings)
        if (request.width, request.height) != image.size:
            logger.info("img2img draws at the input image's size %dx%d; width and height are not used", *image.size)
        return models.img2img, dict(image=image, strength=request.prompt_strength)
    return models.txt2img, dict(width=request.width, height=request.height)


def flag_nsfw(models: SDXLModels, images: list[Image.Image]) -> list[bool]:
    """The safety checker's verdict per image."""
    clip_input = models.feature_extractor(images, return_tensors="pt").pixel_values
    checker = models.safety_checker
    with torch.inference_mode():
        _, flagged = checker(images=[np.array(image) for image in images],
                             clip_input=clip_input.to(models.runtime.device, checker.dtype))
    return [bool(f) for f in flagged]


def save_images(images: list[Image.Image], out_dir: Path, output_format: str, quality: int,
                keep: list[bool] | None = None) -> list[Path]:
    """Write ``out-<index>.<format>`` for each kept image, in order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        if keep is not None and not keep[index]:
            continue
        path = out_dir / f"out-{index}.{output_format}"
        options = {} if output_format == "png" else {"quality": quality}
        image.convert("RGB").save(path, OUTPUT_FORMATS[output_format], **options)
        paths.append(path)
    return paths


def generate_files(models: SDXLModels, request: GenerationRequest, prompt: str, out_dir: Path) -> list[Path]:
    """Generate, drop images the safety checker flags (unless disabled), and save the rest."""
    images = generate(models, request, prompt)
    keep = None
    if not request.disable_safety_checker:
        flagged = flag_nsfw(models, images)
        for index in (i for i, f in enumerate(flagged) if f):
            logger.warning("NSFW content detected in image %d", index)
        if all(flagged):
            raise NSFWError("NSFW content detected. Try running it again, or try a different prompt.")
        keep = [not f for f in flagged]
    return save_images(images, out_dir, request.output_format, request.output_quality, keep)
