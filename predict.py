"""Cog predictor: SDXL txt2img / img2img / inpaint / refiner with trained weights hot-loaded per call.

A thin adapter: Cog inputs (the names, types, defaults and meanings of replicate/cog-sdxl, plus ``output_format``,
``output_quality`` and newer schedulers) become a :class:`generation.GenerationRequest`; the weights are switched by
:class:`weights_manager.WeightsManager`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from typing import Optional, Union

from cog import BasePredictor, Input, Path

from pti.inference.generation import (
    MAX_IMAGE_SIDE,
    MIN_IMAGE_SIDE,
    OUTPUT_FORMATS,
    REFINE_MODES,
    SCHEDULERS,
    GenerationRequest,
    ModelSettings,
    generate_files,
    load_models,
    validate_request,
)
from weights_manager import (
    WeightsChoice,
    WeightsManager,
    WeightsSettings,
    check_lora_scale,
    embeddings_choices,
    extra_lora_choices,
)

logger = logging.getLogger(__name__)


def weights_source(weights: Path | str | None) -> str | None:
    """The weights Cog passed to ``setup`` (``COG_WEIGHTS``) as a source string; Cog's placeholder "weights"
    path that does not exist means none, as in cog-sdxl."""
    if weights is None or str(weights).strip() == "":
        return None
    text = str(weights)
    if text == "weights" and not os.path.exists(text):
        return None
    return text


class Predictor(BasePredictor):
    def _fresh_output_dir(self) -> Path:
        """An empty folder for this prediction's files; the previous prediction's (already returned) are removed,
        so serving thousands of predictions does not fill the disk."""
        for previous in self.outputs_root.iterdir():
            shutil.rmtree(previous, ignore_errors=True)
        return Path(tempfile.mkdtemp(dir=self.outputs_root))

    def setup(self, weights: Optional[Union[Path, str]] = None) -> None:
        """Load the base model and safety checker once (from the weights folder when it has them: no network; the
        refiner loads on the first request that asks for it); preload ``weights`` (the default weights)."""
        started = time.perf_counter()
        self.models = load_models(ModelSettings.from_env())
        self.weights = WeightsManager(self.models.text_pipelines, WeightsSettings.from_env())
        self.default_weights = weights_source(weights)
        self.outputs_root = Path(tempfile.mkdtemp(prefix="predict-outputs-"))
        if self.default_weights:
            self.weights.use_all([WeightsChoice(self.default_weights, 0.6, "default weights", trusted=True)])
        logger.info("setup took %.1fs", time.perf_counter() - started)

    def predict(
        self,
        prompt: str = Input(description="Input prompt", default="An astronaut riding a rainbow unicorn"),
        negative_prompt: str = Input(description="Input Negative Prompt", default=""),
        image: Optional[Path] = Input(description="Input image for img2img or inpaint mode", default=None),
        mask: Optional[Path] = Input(
            description="Input mask for inpaint mode. Black areas will be preserved, white areas will be inpainted.",
            default=None,
        ),
        width: int = Input(
            description="Width of output image: a multiple of 8 (not used by img2img, which keeps the input "
            "image's size)", ge=MIN_IMAGE_SIDE, le=MAX_IMAGE_SIDE, default=1024,
        ),
        height: int = Input(
            description="Height of output image: a multiple of 8 (not used by img2img, which keeps the input "
            "image's size)", ge=MIN_IMAGE_SIDE, le=MAX_IMAGE_SIDE, default=1024,
        ),
        num_outputs: int = Input(description="Number of images to output.", ge=1, le=4, default=1),
        scheduler: str = Input(description="scheduler", choices=list(SCHEDULERS), default="K_EULER"),
        num_inference_steps: int = Input(description="Number of denoising steps", ge=1, le=500, default=50),
        guidance_scale: float = Input(description="Scale for classifier-free guidance", ge=1, le=50, default=7.5),
        prompt_strength: float = Input(
            description="Prompt strength when using img2img / inpaint. 1.0 corresponds to full destruction of "
            "information in image",
            ge=0.0, le=1.0, default=0.8,
        ),
        seed: Optional[int] = Input(description="Random seed. Leave blank to randomize the seed", default=None),
        refine: str = Input(description="Which refine style to use", choices=list(REFINE_MODES), default="no_refiner"),
        high_noise_frac: float = Input(
            description="For expert_ensemble_refiner, the fraction of noise to use", ge=0.0, le=1.0, default=0.8
        ),
        refine_steps: Optional[int] = Input(
            description="For base_image_refiner, the number of steps to refine, defaults to num_inference_steps",
            default=None,
        ),
        apply_watermark: bool = Input(
            description="Applies a watermark to enable determining if an image is generated in downstream "
            "applications. If you have other provisions for generating or deploying images safely, you can use "
            "this to disable watermarking.",
            default=True,
        ),
        lora_scale: float = Input(
            description="LoRA additive scale. Only applicable on trained models.", ge=0.0, le=2.0, default=0.6
        ),
        replicate_weights: Optional[str] = Input(
            description="Replicate LoRA weights to use: the URL (or data: URI) of a trained tar, a cog-sdxl tar or a "
            "kohya/diffusers .safetensors LoRA. Leave blank to use the default weights.", default=None
        ),
        extra_lora: Optional[Union[str, list[str]]] = Input(
            description="More LoRAs beside replicate_weights, each any kind replicate_weights takes: one URL or a "
            "list of them. Their trigger words work too.", default=None
        ),
        extra_lora_scale: Union[float, list[float]] = Input(
            description="Scale of the extra LoRAs, 0 to 2: one number for all, or a list with one per extra_lora",
            default=1.0,
        ),
        embeddings: Optional[Union[str, list[str]]] = Input(
            description="SDXL embedding files (.safetensors with clip_l and clip_g, as A1111, ComfyUI and civitai use "
            "them, or embeddings/TOK.safetensors from a trained tar): one URL or a list. The file name is the "
            "trigger word (.../TOK.safetensors: TOK in the prompt); add #trigger=WORD to the URL to choose another.",
            default=None,
        ),
        disable_safety_checker: bool = Input(
            description="Disable safety checker for generated images. This feature is only available through the "
            "API. See [https://replicate.com/docs/how-does-replicate-work#safety]"
            "(https://replicate.com/docs/how-does-replicate-work#safety)",
            default=False,
        ),
        output_format: str = Input(
            description="Format of the output images", choices=list(OUTPUT_FORMATS), default="webp"
        ),
        output_quality: int = Input(
            description="Quality when saving the output images, from 0 to 100. 100 is best quality, 0 is lowest "
            "quality. Not relevant for .png outputs",
            ge=0, le=100, default=80,
        ),
    ) -> list[Path]:
        """Run a single prediction on the model."""
        if seed is None:
            seed = int.from_bytes(os.urandom(2), "big")
        logger.info("Using seed: %d", seed)
        request = GenerationRequest(
            prompt=prompt, negative_prompt=negative_prompt, image=image, mask=mask, width=width, height=height,
            num_outputs=num_outputs, scheduler=scheduler, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, prompt_strength=prompt_strength, seed=seed, refine=refine,
            high_noise_frac=high_noise_frac, refine_steps=refine_steps, apply_watermark=apply_watermark,
            disable_safety_checker=disable_safety_checker, output_format=output_format, output_quality=output_quality,
        )
        validate_request(request, self.models.settings)
        check_lora_scale("lora_scale", lora_scale)
        choices = extra_lora_choices(extra_lora, extra_lora_scale) + embeddings_choices(embeddings)
        if replicate_weights:
            choices.insert(0, WeightsChoice(replicate_weights, lora_scale, "replicate_weights"))
        elif self.default_weights:
            choices.insert(0, WeightsChoice(self.default_weights, lora_scale, "default weights", trusted=True))
        self.weights.use_all(choices)
        expanded, expanded_negative = self.weights.expand_prompts(prompt, negative_prompt)
        request = dataclasses.replace(request, negative_prompt=expanded_negative)
        paths = generate_files(self.models, request, expanded, self._fresh_output_dir())
        self.record_metric("num_outputs", num_outputs)
        self.record_metric("width", width)
        self.record_metric("height", height)
        return [Path(p) for p in paths]


def default_inputs() -> dict:
    """Every ``predict()`` input at its default, for calling the predictor from Python (benchmarks, tests, scripts):
    called directly, an omitted input would arrive as Cog's ``Input(...)`` object, not its default."""
    import inspect

    return {name: parameter.default.default for name, parameter in inspect.signature(Predictor.predict).parameters.items()
            if name != "self"}
