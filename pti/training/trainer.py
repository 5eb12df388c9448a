"""Pivotal tuning for SDXL: new-token embeddings in both text encoders + a PEFT LoRA on the UNet.

``train_model(TrainingSettings(...))`` validates every setting (before any model loads), trains, and writes the
artifact folder through :mod:`export`. The embeddings train for the first ``ti_frac`` of optimizer steps (the
pivot); after it only the UNet trains, the text encoders' outputs for every caption are computed once and the
encoders leave the device. With ``train_text_encoder`` both encoders also carry LoRA adapters
(:mod:`text_encoder_lora`) that train for the first ``text_encoder_frac`` of the steps; the outputs are cached only
once neither the embeddings nor these adapters train.

Multi-GPU: run the same code under ``accelerate launch``; every process takes its own slice of each global batch
(``train_batch_size`` x processes samples), the UNet is wrapped in DDP, embedding gradients are averaged across
processes, and only the main process writes. Every random draw of a sample (flip, caption dropout/shuffle, noise,
offset and pyramid noise, timestep) comes from generators keyed by the sample's place in the step's global batch
(:class:`SampleKey`), so N processes x batch B train like one process x batch N*B, and a resume continues exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import random
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from pti.models import base_model
from pti.models.single_file import BaseModelSource
from pti.training.checkpoints import (
    Checkpoint,
    CheckpointError,
    capture_rng,
    find_resume_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from pti.dataset.cached import CachedDataset
from pti.dataset.errors import DatasetError
from pti.dataset.folder import DatasetItem, read_dataset_folder
from pti.dataset.text import CaptionAugmentation, PromptTokenizer, encode_prompt
from pti.dataset.token_embeddings import TokenEmbeddingsHandler
from pti.dataset.triggers import TriggerWord, all_new_tokens, contains_trigger, parse_token_string, replace_trigger_words, special_params
from pti.training.failures import check_finite, out_of_memory
from pti.formats.export import SAVE_PRECISIONS
from pti.formats.lora_formats import UNetLayout
from pti.training.losses import (
    MIN_SNR_PREDICTION_TYPES,
    compute_snr,
    masked_mse_per_sample,
    min_snr_weights,
    offset_noise,
    pyramid_noise,
)
from pti.training.max_norm import NormStats, apply_max_norm
from pti.training.optim import SCHEDULERS, ParamGroup, ProdigySettings, build_optimizer, build_scheduler, check_optimizer_available
from pti.training.process_sync import PeerFailed, SharedStep
from pti.training.step_hooks import StepHooks
from pti.training.text_cache import DEFAULT_TEXT_CACHE_BYTES, TextCache
from pti.training.text_encoder_lora import TextEncoderLora, TextEncoderLoraSettings

logger = logging.getLogger(__name__)

DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
GENERATED_CLASS_FOLDER = "generated"  # class images rendered from class_prompt, beside the uploaded ones
PIVOT_ENCODE_CHUNK = 16  # captions encoded per text-encoder call at the pivot (hidden states of all at once spike)
INITIAL_LOSS_SCALE = 2.0**16
MIN_LOSS_SCALE = 1.0  # fp16 loss scaling that has fallen this far is not an overflow but a diverged run
DEFAULT_PRODIGY_D_COEF = 1.0
DEFAULT_PYRAMID_DISCOUNT = 0.3  # kohya's multires_noise_discount recommendation
MAX_PYRAMID_ITERATIONS = 10  # kohya's guides use 6-10; at 2**10 the coarsest level of any latent is one pixel
MAX_D_COEF = 10.0  # Prodigy's README suggests 0.5 or 2 to halve or double its step size
DEFAULT_TEXT_ENCODER_LR = 5e-5  # half the LoRA default, as kohya's SDXL guides set text_encoder_lr below unet_lr
DEFAULT_TEXT_ENCODER_WEIGHT_DECAY = 1e-3  # diffusers' advanced SDXL script (adam_weight_decay_text_encoder)


class SettingsError(ValueError):
    """A training setting that cannot work, one line saying what to change."""


@dataclass
class TrainingSettings:
    dataset_dir: Path  # dataset folder (docs/CONTRACTS.md) or a plain folder of images
    output_dir: Path  # artifact folder (weights, samples/, logs/, loss.png): everything in it goes into the tar
    checkpoint_dir: Path | None = None  # None: <output_dir>-checkpoints, next to the artifact folder
    base_model: str | None = None  # None: env SDXL_MODEL
    inputs: dict | None = None  # the caller's own inputs (train() arguments), recorded in training_config.json
    precision: str = "auto"  # base_model.pick_runtime
    device: str | None = None
    seed: int = 42
    resolution: int = 768  # plain-folder images are centre-cropped/resized to this; sample size
    train_batch_size: int = 4
    num_train_epochs: int = 4000
    max_train_steps: int | None = 1000  # optimizer steps; takes precedence over num_train_epochs
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0  # None: no clipping
    # new tokens
    token_string: str = "TOK"  # "TOK" or "TOK:2,STY:1"
    num_new_tokens: int = 2
    token_init_word: str | None = None  # None: random rows scaled to the table's std
    caption_prefix: str = "a photo of TOK, "  # captions of a plain folder of images
    repeats: int = 1  # every training image is seen this many times per epoch (times its folder's repeats)
    ti_frac: float = 0.5  # fraction of optimizer steps that train the embeddings (the pivot)
    ti_lr: float = 3e-4
    ti_weight_decay: float = 0.0
    # UNet
    is_lora: bool = True
    lora_lr: float = 1e-4
    lora_weight_decay: float = 1e-4
    unet_learning_rate: float = 1e-6  # full fine-tune (is_lora=False)
    unet_weight_decay: float = 1e-2
    lora_rank: int = 32
    lora_alpha: float | None = None  # None: = lora_rank
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS
    use_dora: bool = False
    scale_weight_norms: float | None = None  # kohya's max-norm regularisation of each LoRA module (None: off)
    # text-encoder LoRA (diffusers' --train_text_encoder; kohya trains it unless network_train_unet_only)
    train_text_encoder: bool = False
    text_encoder_lr: float = DEFAULT_TEXT_ENCODER_LR
    text_encoder_weight_decay: float = DEFAULT_TEXT_ENCODER_WEIGHT_DECAY
    text_encoder_lora_rank: int | None = None  # None: = lora_rank (alpha is lora_alpha, one number as in kohya)
    text_encoder_frac: float = 1.0  # fraction of optimizer steps it trains (kohya's stop_text_encoder_training)
    gradient_checkpointing: bool | None = None  # None: switched on when a step would not fit in free memory
    compile_unet: bool = False  # torch.compile the UNet's training forward (minutes of compilation: long GPU runs)
    # optimizer and schedule
    optimizer: str = "adamw"  # adamw | prodigy | adamw8bit
    prodigy_d_coef: float = DEFAULT_PRODIGY_D_COEF
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 100
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    # loss and noise
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0
    pyramid_noise_iterations: int = 0
    pyramid_noise_discount: float = DEFAULT_PYRAMID_DISCOUNT
    # data augmentation
    caption_dropout: float = 0.0
    caption_shuffle: bool = False
    keep_tokens: int = 1
    text_cache_max_bytes: int = DEFAULT_TEXT_CACHE_BYTES  # text-encoder outputs kept after the pivot (shuffling)
    flip_augmentation: bool = False
    color_aug_copies: int = 0  # colour augmentation: hue-turned copies cached per training image (0: off)
    # prior preservation
    class_data_dir: Path | None = None
    class_prompt: str | None = None
    prior_loss_weight: float = 1.0
    num_class_images: int = 0  # generate class images with the base model until the folder holds this many
    # checkpoints, validation, logs
    checkpointing_steps: int = 0  # 0: no intermediate checkpoints
    resume_from: Path | None = None  # a checkpoint, a folder of them, or an earlier run's output_dir
    validation_prompts: tuple[str, ...] = ("a photo of TOK",)
    validation_num_inference_steps: int = 25
    name: str = "trained_model"
    save_precision: str = "fp16"  # the weight files' dtype: fp16, bf16 or fp32 (formats.export.SAVE_PRECISIONS)
    show_progress: bool = True

    def validate(self) -> None:
        """Every check that needs no model; raises :class:`SettingsError` with a one-line message."""
        positive_ints = {"train_batch_size": self.train_batch_size, "num_train_epochs": self.num_train_epochs,
                         "gradient_accumulation_steps": self.gradient_accumulation_steps,
                         "num_new_tokens": self.num_new_tokens, "resolution": self.resolution,
                         "repeats": self.repeats, "text_cache_max_bytes": self.text_cache_max_bytes,
                         "lora_rank": self.lora_rank, "validation_num_inference_steps":
                         self.validation_num_inference_steps}
        for name, value in positive_ints.items():
            if value < 1:
                raise SettingsError(f"{name} must be at least 1, got {value}")
        non_negative = {"lr_warmup_steps": self.lr_warmup_steps, "checkpointing_steps": self.checkpointing_steps,
                        "pyramid_noise_iterations": self.pyramid_noise_iterations,
                        "num_class_images": self.num_class_images, "keep_tokens": self.keep_tokens,
                        "color_aug_copies": self.color_aug_copies,
                        "ti_lr": self.ti_lr, "lora_lr": self.lora_lr, "unet_learning_rate": self.unet_learning_rate,
                        "noise_offset": self.noise_offset, "prior_loss_weight": self.prior_loss_weight}
        for name, value in non_negative.items():
            if value < 0:
                raise SettingsError(f"{name} must not be negative, got {value}")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise SettingsError(f"max_train_steps must be at least 1 (or unset to use epochs), "
                                f"got {self.max_train_steps}")
        if self.resolution % 8:
            raise SettingsError(f"resolution must be a multiple of 8, got {self.resolution}")
        for name, value in {"ti_frac": self.ti_frac, "caption_dropout": self.caption_dropout,
                            "ti_weight_decay": self.ti_weight_decay, "lora_weight_decay": self.lora_weight_decay,
                            "unet_weight_decay": self.unet_weight_decay, "noise_offset": self.noise_offset}.items():
            if not 0.0 <= value <= 1.0:
                raise SettingsError(f"{name} must be between 0 and 1, got {value}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise SettingsError(f"lora_dropout must be at least 0 and below 1 (1 drops every input: the LoRA "
                                f"never learns), got {self.lora_dropout}")
        self._validate_knobs()
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise SettingsError(f"lora_alpha must be positive, got {self.lora_alpha}")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise SettingsError(f"min_snr_gamma must be positive (or unset), got {self.min_snr_gamma}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise SettingsError(f"max_grad_norm must be positive (or unset), got {self.max_grad_norm}")
        if not self.lora_target_modules:
            raise SettingsError("lora_target_modules is empty; e.g. to_q,to_k,to_v,to_out.0")
        if self.save_precision not in SAVE_PRECISIONS:
            raise SettingsError(f"save_precision must be one of {', '.join(SAVE_PRECISIONS)}; "
                                f"got {self.save_precision!r}")
        if self.lr_scheduler not in SCHEDULERS:
            raise SettingsError(f"lr_scheduler must be one of {', '.join(SCHEDULERS)}; got {self.lr_scheduler!r}")
        if (self.class_data_dir is None) != (self.class_prompt is None):
            raise SettingsError("prior preservation needs both class_data_dir and class_prompt (or neither)")

    def _validate_knobs(self) -> None:
        """The optimizer, noise and LoRA-regularisation knobs: each in its range, and none set where it would do
        nothing (a changed value the run would silently ignore is refused, naming what it needs)."""
        if not 0.0 < self.prodigy_d_coef <= MAX_D_COEF:
            raise SettingsError(f"prodigy_d_coef must be above 0 and at most {MAX_D_COEF:g}, got {self.prodigy_d_coef}")
        if self.prodigy_d_coef != DEFAULT_PRODIGY_D_COEF and self.optimizer != "prodigy":
            raise SettingsError(f"prodigy_d_coef only applies to optimizer=prodigy (got optimizer={self.optimizer}); "
                                f"leave it at {DEFAULT_PRODIGY_D_COEF:g} or choose prodigy")
        if self.pyramid_noise_iterations > MAX_PYRAMID_ITERATIONS:
            raise SettingsError(f"pyramid_noise_iterations must be at most {MAX_PYRAMID_ITERATIONS}, "
                                f"got {self.pyramid_noise_iterations}")
        if not 0.0 < self.pyramid_noise_discount <= 1.0:
            raise SettingsError(f"pyramid_noise_discount must be above 0 and at most 1, "
                                f"got {self.pyramid_noise_discount}")
        if self.pyramid_noise_discount != DEFAULT_PYRAMID_DISCOUNT and self.pyramid_noise_iterations == 0:
            raise SettingsError("pyramid_noise_discount needs pyramid_noise_iterations of 1 or more (6-10 is usual); "
                                "with 0 there is no pyramid noise to discount")
        if self.scale_weight_norms is not None:
            if self.scale_weight_norms <= 0:
                raise SettingsError(f"scale_weight_norms must be positive (or unset), got {self.scale_weight_norms}")
            if not self.is_lora:
                raise SettingsError("scale_weight_norms limits LoRA weights; it needs is_lora=true")
            if self.use_dora:
                raise SettingsError("scale_weight_norms does not apply to DoRA (its magnitude vector sets each "
                                    "weight's norm); turn off use_dora or scale_weight_norms")
        if not self.is_lora and self.lora_dropout > 0:
            raise SettingsError("lora_dropout applies to LoRA layers; it needs is_lora=true")
        self._validate_text_encoder()

    def _validate_text_encoder(self) -> None:
        """The text-encoder LoRA's settings: in range, and changed only where train_text_encoder uses them."""
        if self.text_encoder_lr < 0:
            raise SettingsError(f"text_encoder_lr must not be negative, got {self.text_encoder_lr}")
        if not 0.0 <= self.text_encoder_weight_decay <= 1.0:
            raise SettingsError(f"text_encoder_weight_decay must be between 0 and 1, got "
                                f"{self.text_encoder_weight_decay}")
        if self.text_encoder_lora_rank is not None and self.text_encoder_lora_rank < 1:
            raise SettingsError(f"text_encoder_lora_rank must be at least 1 (or unset: lora_rank), got "
                                f"{self.text_encoder_lora_rank}")
        if not 0.0 < self.text_encoder_frac <= 1.0:
            raise SettingsError(f"text_encoder_frac must be above 0 and at most 1 (the fraction of steps the "
                                f"text-encoder LoRA trains), got {self.text_encoder_frac}")
        if self.train_text_encoder:
            if not self.is_lora:
                raise SettingsError("train_text_encoder trains LoRA adapters on the text encoders; it needs "
                                    "is_lora=true")
            return
        changed = {"text_encoder_lr": self.text_encoder_lr != DEFAULT_TEXT_ENCODER_LR,
                   "text_encoder_weight_decay": self.text_encoder_weight_decay != DEFAULT_TEXT_ENCODER_WEIGHT_DECAY,
                   "text_encoder_lora_rank": self.text_encoder_lora_rank is not None,
                   "text_encoder_frac": self.text_encoder_frac != 1.0}
        for name, is_changed in changed.items():
            if is_changed:
                raise SettingsError(f"{name} applies to the text-encoder LoRA; set train_text_encoder=true or "
                                    f"leave {name} at its default")

    @property
    def alpha(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank)

    @property
    def text_encoder_rank(self) -> int:
        return self.text_encoder_lora_rank if self.text_encoder_lora_rank is not None else self.lora_rank

    def as_config(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}


@dataclass
class TrainingPlan:
    """What the settings and the dataset imply, computed before any model loads."""

    triggers: list[TriggerWord]
    items: list[DatasetItem]
    class_items: list[DatasetItem]
    total_steps: int  # optimizer steps
    pivot_step: int  # embeddings train for steps [0, pivot_step)
    resume_checkpoint: Path | None  # the checkpoint resume_from resolves to
    samples_per_epoch: int  # images x their repeats (folder repeats times the repeats setting)
    steps_per_epoch: int  # optimizer steps of one epoch
    text_encoder_stop_step: int = 0  # the text-encoder LoRA trains for steps [0, text_encoder_stop_step); 0: none

    def concepts(self, repeats: int) -> dict[str, dict[str, int]]:
        """Per concept folder word ("" for images outside concept folders): images and samples per epoch."""
        summary: dict[str, dict[str, int]] = {}
        for item in self.items:
            entry = summary.setdefault(item.concept, {"images": 0, "samples_per_epoch": 0})
            entry["images"] += 1
            entry["samples_per_epoch"] += item.repeats * repeats
        return summary


def plan_training(settings: TrainingSettings, num_processes: int = 1) -> TrainingPlan:
    """Validate settings and dataset (no model needed) and derive the step counts."""
    settings.validate()
    try:
        triggers = parse_token_string(settings.token_string, settings.num_new_tokens)
        items = read_dataset_folder(Path(settings.dataset_dir), settings.caption_prefix)
    except DatasetError as err:
        raise SettingsError(str(err)) from None
    for trigger in triggers:
        if not any(contains_trigger(item.caption, trigger) for item in items):
            raise SettingsError(f"trigger word {trigger.word!r} appears in no caption; add it to the captions or "
                                f"caption_prefix (e.g. 'a photo of {trigger.word}'), or change token_string")
    class_items: list[DatasetItem] = []
    if settings.class_data_dir is not None and Path(settings.class_data_dir).is_dir():
        class_items = _class_items(settings)
    if settings.class_data_dir is not None and not class_items and settings.num_class_images == 0:
        raise SettingsError(f"class_data_dir {settings.class_data_dir} holds no images; add some or set "
                            "num_class_images")
    samples_per_epoch = sum(item.repeats for item in items) * settings.repeats
    per_step = settings.train_batch_size * settings.gradient_accumulation_steps * num_processes
    steps_per_epoch = math.ceil(samples_per_epoch / per_step)
    total = settings.max_train_steps if settings.max_train_steps is not None else (
        settings.num_train_epochs * steps_per_epoch)
    resume = None
    if settings.resume_from is not None:
        try:
            resume = find_resume_checkpoint(Path(settings.resume_from))
        except CheckpointError as err:
            raise SettingsError(str(err)) from None
    text_encoder_stop = max(1, int(settings.text_encoder_frac * total)) if settings.train_text_encoder else 0
    return TrainingPlan(triggers, items, class_items, total, int(settings.ti_frac * total), resume,
                        samples_per_epoch, steps_per_epoch, text_encoder_stop)


def _class_items(settings: TrainingSettings) -> list[DatasetItem]:
    """The class images: the uploaded ones (a dataset folder that preprocessing wrote, with their own captions and
    folder repeats, or a plain folder captioned class_prompt), then those generated into ``generated/``."""
    folder = Path(settings.class_data_dir)
    uploaded = _read_class_folder(folder, settings.class_prompt or "")
    if not (folder / "captions.csv").is_file():
        uploaded = [dataclasses.replace(item, caption=settings.class_prompt) for item in uploaded]
    generated = _read_class_folder(folder / GENERATED_CLASS_FOLDER, settings.class_prompt or "")
    return uploaded + [dataclasses.replace(item, caption=settings.class_prompt) for item in generated]


def _read_class_folder(folder: Path, caption: str) -> list[DatasetItem]:
    if not folder.is_dir():
        return []
    try:
        return read_dataset_folder(folder, caption)
    except DatasetError:
        return []


def class_image_counts(items: list[DatasetItem], class_data_dir: Path) -> dict[str, int]:
    """How many class images were uploaded and how many generated."""
    generated = sum(item.image_path.parent == Path(class_data_dir) / GENERATED_CLASS_FOLDER for item in items)
    return {"uploaded": len(items) - generated, "generated": generated}


@dataclass
class TrainingResult:
    output_dir: Path
    total_steps: int
    pivot_step: int
    loss_history: list[float]
    sample_images: list[Path]
    special_params: dict[str, str]
    embeddings: dict[str, torch.Tensor] = field(repr=False)


def train_model(settings: TrainingSettings) -> TrainingResult:
    """Validate, train and write the artifact folder (everything except the tar)."""
    trainer = Trainer.create(settings)
    trainer.run()
    return trainer.export()


class Trainer:
    """One training run. Build with :meth:`create`, then :meth:`run` and :meth:`export`."""

    def __init__(self, settings: TrainingSettings, plan: TrainingPlan, pipe, runtime: base_model.Runtime, accelerator):
        self.settings = settings
        self.plan = plan
        self.pipe = pipe
        self.runtime = runtime
        self.accelerator = accelerator
        self.step = 0  # optimizer steps done
        self.loss_history: list[float] = []
        self.norm_stats: NormStats | None = None  # the last max-norm regularisation (scale_weight_norms)
        self.sample_images: list[Path] = []
        self.step_samples: dict[int, list[Path]] = {}  # intermediate step → its validation samples (main process)
        self.text_cache: TextCache | None = None
        self.text_encoder_lora: TextEncoderLora | None = None  # train_text_encoder's adapters
        self.run_id = uuid.uuid4().hex[:12]  # names this run's markers in shared folders (Trainer.create: the main's)
        self.output_dir = Path(settings.output_dir)
        self.step_hooks: StepHooks = StepHooks()  # phase timing for benchmarks; no-op by default
        self.checkpoint_dir = Path(settings.checkpoint_dir
                                   or self.output_dir.with_name(self.output_dir.name + "-checkpoints"))

    # ------------------------------------------------------------------------------------------------ setup

    @classmethod
    def create(cls, settings: TrainingSettings) -> Trainer:
        from accelerate import Accelerator

        runtime = check_runtime(settings)
        # The precision is the trainer's own (Runtime.autocast, and loss scaling for fp16 below); "no" keeps an
        # `accelerate launch --mixed_precision` from adding a second autocast and a loss scale nothing unscales.
        accelerator = Accelerator(cpu=runtime.device.type == "cpu", mixed_precision="no")
        run_id = uuid.uuid4().hex[:12]
        if accelerator.num_processes > 1:
            seed, run_id = _from_main_process(settings.seed, run_id)
            settings = dataclasses.replace(settings, seed=seed)
        plan = plan_training(settings, accelerator.num_processes)
        if accelerator.num_processes > 1:
            runtime = dataclasses.replace(runtime, device=accelerator.device)
        base_model.allow_tf32(runtime.device)
        pipe = base_model.load_sdxl_pipeline(settings.base_model, runtime)
        trainer = cls(settings, plan, pipe, runtime, accelerator)
        trainer.run_id = run_id
        trainer._prepare()
        return trainer

    def _prepare(self) -> None:
        from accelerate.utils import set_seed

        s, pipe = self.settings, self.pipe
        set_seed(s.seed)  # LoRA init and dropout draw from the global RNGs
        if s.class_data_dir is not None and len(self.plan.class_items) < s.num_class_images:
            self._generate_class_images()
        self.text_encoders = [pipe.text_encoder, pipe.text_encoder_2]
        for encoder in self.text_encoders:
            encoder.to(dtype=self.runtime.dtype).eval().requires_grad_(False)  # frozen; the new rows train in fp32
        pipe.vae.requires_grad_(False)
        if pipe.vae.dtype != self.runtime.vae_dtype:
            pipe.vae.to(dtype=self.runtime.vae_dtype)
        self.embeddings = TokenEmbeddingsHandler(self.text_encoders, [pipe.tokenizer, pipe.tokenizer_2])
        self.embeddings.add_tokens(all_new_tokens(self.plan.triggers), s.token_init_word,
                                   torch.Generator().manual_seed(s.seed))
        self.prompt_tokenizer = PromptTokenizer([pipe.tokenizer, pipe.tokenizer_2])
        self.caption_augmentation = CaptionAugmentation(s.caption_dropout, s.caption_shuffle, s.keep_tokens)
        show = s.show_progress and self.accelerator.is_main_process
        self.dataset = CachedDataset.build(self.plan.items, pipe.vae, self.plan.triggers, resize_to=self._resize_to(),
                                           flip=s.flip_augmentation, device=self.runtime.device,
                                           dtype=self.runtime.vae_dtype, show_progress=show,
                                           color_copies=s.color_aug_copies, seed=s.seed)
        self.class_dataset = None
        if s.class_data_dir is not None:
            self.plan.class_items = _class_items(s)
            if not self.plan.class_items:
                raise SettingsError(f"class_data_dir {s.class_data_dir} holds no images in this process; with "
                                    "several processes it must be a folder all of them share")
            counts = class_image_counts(self.plan.class_items, Path(s.class_data_dir))
            logger.info("class images: %d uploaded, %d generated from class_prompt", counts["uploaded"],
                        counts["generated"])
            prepared = (Path(s.class_data_dir) / "captions.csv").is_file()  # already at their training sizes
            self.class_dataset = CachedDataset.build(self.plan.class_items, pipe.vae, [],
                                                     resize_to=None if prepared else s.resolution,
                                                     flip=s.flip_augmentation, device=self.runtime.device,
                                                     dtype=self.runtime.vae_dtype, show_progress=show)
        self.noise_scheduler = _training_noise_scheduler(pipe.scheduler)
        _check_min_snr(s.min_snr_gamma, self.noise_scheduler.config.prediction_type)
        self._prepare_unet()
        if s.train_text_encoder:  # after the UNet's adapter: its initial draws stay those of a run without
            self.text_encoder_lora = TextEncoderLora.attach(self.text_encoders, TextEncoderLoraSettings(
                s.text_encoder_rank, s.alpha, self.plan.text_encoder_stop_step))
        self._build_optimizer()

    def _resize_to(self) -> int | None:
        """Images of a prepared dataset are already at their training size; a plain folder is resized."""
        return None if (Path(self.settings.dataset_dir) / "captions.csv").is_file() else self.settings.resolution

    def _prepare_unet(self) -> None:
        s, unet = self.settings, self.pipe.unet
        if unet.dtype != self.runtime.dtype:
            unet.to(dtype=self.runtime.dtype)  # frozen weights in the compute dtype: no per-step casts
        unet.requires_grad_(False)
        if not s.is_lora:
            self._refuse_full_finetune_that_cannot_fit(unet)
        if s.is_lora:
            from peft import LoraConfig

            unet.add_adapter(LoraConfig(r=s.lora_rank, lora_alpha=s.alpha, lora_dropout=s.lora_dropout,
                                        init_lora_weights="gaussian", target_modules=list(s.lora_target_modules),
                                        use_dora=s.use_dora))
        else:
            unet.requires_grad_(True)
        for param in unet.parameters():
            if param.requires_grad:
                param.data = param.data.float()  # train in float32; autocast handles the half-precision maths
        unet.train()
        if self._use_gradient_checkpointing(unet):
            unet.enable_gradient_checkpointing()
            for encoder in self.text_encoders:
                encoder.gradient_checkpointing_enable()
        self.unet = unet
        # The UNet already sits on runtime.device (cuda:N with SDXL_DEVICE); accelerate's own placement would move a
        # single process's UNet to "cuda" (GPU 0) and leave everything else on cuda:N.
        self.unet_for_training = self.accelerator.prepare_model(unet, device_placement=False)
        self.loss_scaler = torch.amp.GradScaler(self.runtime.device.type, init_scale=INITIAL_LOSS_SCALE,
                                                enabled=needs_loss_scaling(self.runtime))
        if s.compile_unet:  # the training forward only: samples use the eager UNet and cause no recompilation
            self.unet_for_training = torch.compile(self.unet_for_training)

    def _refuse_full_finetune_that_cannot_fit(self, unet) -> None:
        """A full fine-tune's float32 weights, gradients and optimizer state must fit before anything trains."""
        from pti.training.memory_fit import free_bytes, full_finetune_refusal

        params = list(unet.parameters())
        refusal = full_finetune_refusal(sum(p.numel() for p in params), params[0].element_size(),
                                        self.settings.optimizer, free_bytes(self.runtime.device),
                                        self.runtime.device.type == "cuda")
        if refusal is not None:
            raise SettingsError(refusal)

    def _use_gradient_checkpointing(self, unet) -> bool:
        if self.settings.gradient_checkpointing is not None:
            return self.settings.gradient_checkpointing
        from pti.training.memory_fit import needs_gradient_checkpointing, training_state_bytes

        instances = 2 if self.class_dataset is not None else 1  # prior preservation doubles the batch
        text_width = sum(encoder.config.hidden_size for encoder in self.text_encoders)
        return needs_gradient_checkpointing(
            unet, batch_size=self.settings.train_batch_size * instances,
            latent_size=tuple(self.dataset.items[0].latents.shape[-2:]),
            text_shape=(self.pipe.tokenizer.model_max_length, text_width),
            pooled_dim=self.text_encoders[1].config.projection_dim, device=self.runtime.device,
            autocast=self.runtime.autocast(),
            reserved_bytes=training_state_bytes(sum(p.numel() for p in unet.parameters() if p.requires_grad),
                                                self.settings.optimizer))

    def _build_optimizer(self) -> None:
        s = self.settings
        unet_params = [p for p in self.unet.parameters() if p.requires_grad]
        self.embeddings.set_trainable(True)
        groups = [ParamGroup("embeddings", self.embeddings.rows, s.ti_lr, s.ti_weight_decay)]
        if s.is_lora:
            groups.append(ParamGroup("lora", unet_params, s.lora_lr, s.lora_weight_decay))
        else:
            groups.append(ParamGroup("unet", unet_params, s.unet_learning_rate, s.unet_weight_decay))
        if self.text_encoder_lora is not None:
            groups.append(ParamGroup("text_encoder", self.text_encoder_lora.parameters(), s.text_encoder_lr,
                                     s.text_encoder_weight_decay))
        self.optimizer = build_optimizer(groups, s.optimizer, self.runtime.device,
                                         ProdigySettings(d_coef=s.prodigy_d_coef))
        self.lr_scheduler = build_scheduler(s.lr_scheduler, self.optimizer, warmup_steps=s.lr_warmup_steps,
                                            total_steps=self.plan.total_steps, num_cycles=s.lr_num_cycles,
                                            power=s.lr_power)

    def _generate_class_images(self) -> None:
        """Fill class_data_dir up to num_class_images with images of class_prompt from the base model."""
        from tqdm.auto import tqdm

        s = self.settings
        folder = Path(s.class_data_dir) / GENERATED_CLASS_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        missing = s.num_class_images - len(self.plan.class_items)
        if self.accelerator.is_main_process:
            logger.info("class images: %d found, generating %d more to reach num_class_images=%d",
                        len(self.plan.class_items), missing, s.num_class_images)
        rank, processes = self.accelerator.process_index, self.accelerator.num_processes
        step = SharedStep(folder, self.run_id, "class-images")
        try:
            # Every process renders its share (image i on process i mod N, from seed + i: the same images for any
            # process count) into the folder they all read.
            mine = class_image_indices(missing, rank, processes)
            for index in tqdm(mine, desc="class images", disable=not (s.show_progress and rank == 0)):
                generator = self.runtime.generator(s.seed + index)
                with self.runtime.autocast():  # frozen weights may be half precision
                    image = self.pipe(s.class_prompt, height=s.resolution, width=s.resolution, generator=generator,
                                      num_inference_steps=s.validation_num_inference_steps).images[0]
                target = folder / f"class-{len(self.plan.class_items) + index:04d}.png"
                staging = target.with_name(f".{target.name}.tmp.png")
                image.save(staging)
                staging.replace(target)
        except Exception as error:
            if processes > 1:
                step.mark_failed(f"{type(error).__name__}: {error}", part=str(rank))
            raise
        if processes > 1:
            step.mark_done(part=str(rank))
            try:  # a file-based wait: no collective is pending while the slowest process renders
                step.wait([str(r) for r in range(processes)])
            except PeerFailed as error:
                raise SettingsError(str(error)) from None
            self.accelerator.wait_for_everyone()  # everyone has seen every marker: safe to remove them
            if self.accelerator.is_main_process:
                step.clear()

    # --------------------------------------------------------------------------------------------- training

    @property
    def training_embeddings(self) -> bool:
        return self.step < self.plan.pivot_step

    @property
    def training_text_encoder(self) -> bool:
        """Whether the text-encoder LoRA trains in the current step."""
        return self.text_encoder_lora is not None and self.text_encoder_lora.trains_at(self.step)

    @property
    def training_text(self) -> bool:
        """Whether anything before the UNet trains (the text encoders' outputs change from step to step)."""
        return self.training_embeddings or self.training_text_encoder

    def run(self) -> None:
        from tqdm.auto import tqdm

        s = self.settings
        if self.plan.resume_checkpoint is not None:
            self._load_checkpoint(self.plan.resume_checkpoint)
        main = self.accelerator.is_main_process
        writer = self._summary_writer() if main else None
        progress = tqdm(total=self.plan.total_steps, initial=self.step, desc="training",
                        disable=not (s.show_progress and main))
        while self.step < self.plan.total_steps:
            self._freeze_what_stopped()
            if not self.training_text and self.text_cache is None:
                self._pass_pivot()
            trains_embeddings = self.training_embeddings
            loss = self._optimizer_step()
            self.step += 1
            self.step_hooks.step_done(self.step, pivoted=not trains_embeddings)
            self.loss_history.append(loss)
            lr = self.lr_scheduler.get_last_lr()[-1]
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", **self._norm_postfix())
            progress.update(1)
            if writer is not None:
                writer.add_scalar("loss", loss, self.step)
                writer.add_scalar("lr", lr, self.step)
                if self.norm_stats is not None:
                    for name, value in self.norm_stats.as_config().items():
                        writer.add_scalar(f"lora_norm/{name}", value, self.step)
            if s.checkpointing_steps and self.step % s.checkpointing_steps == 0 and self.step < self.plan.total_steps:
                self._save_checkpoint()
        progress.close()
        if writer is not None:
            writer.close()
        if self.norm_stats is not None:
            logger.info("scale_weight_norms=%g: %d LoRA modules scaled at the last step; mean norm %.4g, max %.4g",
                        s.scale_weight_norms, self.norm_stats.keys_scaled, self.norm_stats.mean_norm,
                        self.norm_stats.max_norm)

    def _norm_postfix(self) -> dict[str, str]:
        """kohya's progress-bar figures of max-norm regularisation: modules scaled, mean and largest norm."""
        if self.norm_stats is None:
            return {}
        return {"keys_scaled": str(self.norm_stats.keys_scaled), "avg_norm": f"{self.norm_stats.mean_norm:.3g}",
                "max_norm": f"{self.norm_stats.max_norm:.3g}"}

    def _optimizer_step(self) -> float:
        s, hooks = self.settings, self.step_hooks
        accumulation = s.gradient_accumulation_steps
        total = 0.0
        try:
            for micro in range(accumulation):
                last = micro == accumulation - 1
                with hooks.phase("data"):
                    batch = self._batch(micro)
                with contextlib.nullcontext() if last else self.accelerator.no_sync(self.unet_for_training):
                    loss = self._loss(batch)
                    with hooks.phase("backward"):
                        self.accelerator.backward(self.loss_scaler.scale(loss / accumulation))
                total += loss.detach().item() / accumulation
        except torch.OutOfMemoryError as error:
            raise out_of_memory(self.step + 1, self._memory_settings()) from error
        with hooks.phase("optimizer"):
            if self.accelerator.num_processes > 1:
                total = self.accelerator.reduce(torch.tensor(total, device=self.runtime.device), "mean").item()
                # The text encoders are not DDP-wrapped: what trains in them is averaged here.
                text_params = [*(self.embeddings.rows if self.training_embeddings else []),
                               *(self.text_encoder_lora.parameters() if self.training_text_encoder else [])]
                for param in text_params:
                    if param.grad is None:  # e.g. no new token in this process's captions (caption dropout)
                        param.grad = torch.zeros_like(param)
                    param.grad = self.accelerator.reduce(param.grad, reduction="mean")
            self.loss_scaler.unscale_(self.optimizer)  # clip (and check) the true gradients, not the scaled ones
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm or math.inf)
            if not self._loss_scale_overflow(total, float(grad_norm)):
                check_finite(self.step + 1, total, float(grad_norm), self._learning_rates(),
                             full_precision=self.runtime.dtype == torch.float32)
            self.loss_scaler.step(self.optimizer)  # skipped (scale lowered) after an fp16 overflow
            self.loss_scaler.update()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if s.scale_weight_norms is not None:
                self.norm_stats = apply_max_norm(self._max_norm_modules(), s.scale_weight_norms)
            if self.training_embeddings:
                self.embeddings.retract_embeddings()
        return total

    def _max_norm_modules(self) -> torch.nn.Module:
        """The models whose LoRA layers max-norm regularisation limits: the UNet, and the text encoders while their
        LoRA trains (kohya limits every LoRA module of the network)."""
        if not self.training_text_encoder:
            return self.unet
        return torch.nn.ModuleList([self.unet, *self.text_encoders])

    def _freeze_what_stopped(self) -> None:
        """The embeddings after the pivot, the text-encoder LoRA after its stop step: no gradient, so the
        optimizer leaves them exactly as they are."""
        if not self.training_embeddings and any(rows.requires_grad for rows in self.embeddings.rows):
            self.embeddings.set_trainable(False)
        if self.text_encoder_lora is not None and not self.training_text_encoder and self.text_encoder_lora.trainable:
            self.text_encoder_lora.set_trainable(False)

    def _loss_scale_overflow(self, loss: float, grad_norm: float) -> bool:
        """An fp16 gradient overflow at the current loss scale: the scaler skips this step and halves the scale."""
        return (self.loss_scaler.is_enabled() and math.isfinite(loss) and not math.isfinite(grad_norm)
                and self.loss_scaler.get_scale() > MIN_LOSS_SCALE)

    def _learning_rates(self) -> dict[str, float]:
        """The learning-rate settings of what trains in this step (for error messages)."""
        s = self.settings
        rates = {"ti_lr": s.ti_lr} if self.training_embeddings else {}
        rates.update({"lora_lr": s.lora_lr} if s.is_lora else {"unet_learning_rate": s.unet_learning_rate})
        rates.update({"text_encoder_lr": s.text_encoder_lr} if self.training_text_encoder else {})
        return rates

    def _memory_settings(self) -> str:
        s = self.settings
        return (f"train_batch_size={s.train_batch_size}, resolution={s.resolution}, "
                f"gradient_checkpointing={str(self.unet.is_gradient_checkpointing).lower()}")

    def _batch(self, micro: int) -> dict:
        """This process's slice of micro-batch ``micro`` of the current step. The global micro-batch
        (``train_batch_size`` x processes samples) is a pure function of seed and step, so the data order survives a
        resume without any sampler state and does not depend on how the samples are spread over processes. With
        prior preservation the batch carries a class batch under ``"class"``."""
        s = self.settings
        size, rank = s.train_batch_size, self.accelerator.process_index
        width = size * self.accelerator.num_processes
        number = self.step * s.gradient_accumulation_steps + micro
        slots = [micro * width + rank * size + index for index in range(size)]
        batch = self._draw(self.dataset, number, s.seed, width, slots, SampleKey.INSTANCE)
        if self.class_dataset is not None:
            batch["class"] = self._draw(self.class_dataset, number, s.seed + 1, width, slots, SampleKey.CLASS)
        return batch

    def _draw(self, dataset: CachedDataset, number: int, seed: int, width: int, slots: list[int],
              stream: int) -> dict:
        """This process's ``slots`` of global batch ``number`` of the endless stream of epochs (every global batch
        holds images of one size, a bucket), with each sample's flip and caption augmentation drawn from its key."""
        sizes = tuple(tuple(item.latents.shape[-2:]) for item in dataset.items)
        scale = self.settings.repeats if stream == SampleKey.INSTANCE else 1
        repeats = tuple(item.repeats * scale for item in dataset.items)
        per_epoch = len(_epoch_batches(seed, 0, sizes, width, repeats))
        members = _epoch_batches(seed, number // per_epoch, sizes, width, repeats)[number % per_epoch]
        keys = [SampleKey(self.settings.seed, self.step, slot, stream) for slot in slots]
        indices = [members[slot % width] for slot in slots]
        rngs = [key.python_rng() for key in keys]
        flips = [self.settings.flip_augmentation and rng.random() < 0.5 for rng in rngs]
        colors = [rng.randrange(len(dataset.items[i].color_copies) + 1) if dataset.items[i].color_copies else 0
                  for i, rng in zip(indices, rngs)]
        batch = dataset.batch(indices, flips, colors)
        batch["colors"] = colors
        batch["captions"] = [self.caption_augmentation.apply(c, rng) for c, rng in zip(batch["captions"], rngs)]
        batch["keys"] = keys
        return batch

    def _loss(self, batch: dict) -> torch.Tensor:
        loss = self._batch_losses(batch).mean()
        if "class" in batch:
            loss = loss + self.settings.prior_loss_weight * self._batch_losses(batch["class"]).mean()
        return loss

    def _batch_losses(self, batch: dict) -> torch.Tensor:
        device = self.runtime.device
        latents = batch["latents"].to(device)
        noise, timesteps = zip(*(self._sample_noise(key, tuple(latents.shape[1:])) for key in batch["keys"]))
        return self.denoising_losses(latents, batch["masks"].to(device), batch["captions"],
                                     batch["time_ids"].to(device), torch.cat(noise).to(device),
                                     torch.cat(timesteps).to(device))

    def _sample_noise(self, key: SampleKey, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """One sample's noise ``[1, *shape]`` (with offset and pyramid noise) and timestep ``[1]``, drawn on the CPU
        from the sample's own generator: the same on any device and in any process layout."""
        s, generator = self.settings, key.torch_generator()
        noise = torch.randn((1, *shape), generator=generator)
        noise = offset_noise(noise, s.noise_offset, generator)
        noise = pyramid_noise(noise, s.pyramid_noise_iterations, s.pyramid_noise_discount, generator)
        timestep = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (1,), generator=generator)
        return noise, timestep

    def denoising_losses(self, latents: torch.Tensor, masks: torch.Tensor, captions: list[str],
                         time_ids: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Masked (min-SNR weighted) denoising loss per sample at the given noise and timesteps."""
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        with self.step_hooks.phase("text_encoders"):
            prompt_embeds, pooled = self.text_conditioning(captions)
        with self.step_hooks.phase("unet_forward"), self.runtime.autocast():
            prediction = self.unet_for_training(noisy, timesteps, prompt_embeds,
                                                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        prediction_type = self.noise_scheduler.config.prediction_type
        target = noise if prediction_type == "epsilon" else self.noise_scheduler.get_velocity(latents, noise, timesteps)
        losses = masked_mse_per_sample(prediction, target, masks)
        if self.settings.min_snr_gamma is not None:
            snr = compute_snr(self.noise_scheduler.alphas_cumprod, timesteps.cpu()).to(losses.device)
            losses = losses * min_snr_weights(snr, self.settings.min_snr_gamma, prediction_type)
        return losses

    def text_conditioning(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds, pooled): from the encoders while the embeddings or the text-encoder LoRA train, from the
        cache after that."""
        if self.text_cache is None or any(c not in self.text_cache for c in captions):
            with torch.set_grad_enabled(self.training_text and torch.is_grad_enabled()), self.runtime.autocast():
                embeds, pooled = encode_prompt(self.text_encoders, self.prompt_tokenizer(captions))
            if self.text_cache is not None:
                self._remember(captions, embeds, pooled)
            return embeds, pooled
        entries = [self.text_cache.get(c) for c in captions]
        return torch.stack([e for e, _ in entries]), torch.stack([p for _, p in entries])

    def _pass_pivot(self) -> None:
        """Once nothing in the text encoders trains (the embeddings after the pivot, a text-encoder LoRA after its
        stop step): encode every caption the rest of the run can see once, and move the encoders off the device
        (they stay only when caption shuffling makes the captions unpredictable)."""
        # Shuffled captions are unpredictable: they join as seen, within a byte budget. Otherwise the set is fixed
        # and every caption must stay, as the encoders leave the device.
        self.text_cache = TextCache(self.settings.text_cache_max_bytes if self.settings.caption_shuffle else None)
        captions = sorted({item.caption for item in self.dataset.items})
        if self.class_dataset is not None:
            captions += sorted({item.caption for item in self.class_dataset.items} - set(captions))
        if self.settings.caption_dropout > 0:
            captions.append("")
        for start in range(0, len(captions), PIVOT_ENCODE_CHUNK):  # chunks: the hidden states of all at once spike
            chunk = captions[start:start + PIVOT_ENCODE_CHUNK]
            with torch.no_grad(), self.runtime.autocast():
                embeds, pooled = encode_prompt(self.text_encoders, self.prompt_tokenizer(chunk))
            self._remember(chunk, embeds, pooled)
        if not self.settings.caption_shuffle:
            self._move_text_encoders(torch.device("cpu"))

    def _remember(self, captions: list[str], embeds: torch.Tensor, pooled: torch.Tensor) -> None:
        for caption, e, p in zip(captions, embeds.detach(), pooled.detach()):
            self.text_cache.put(caption, e, p)

    def _move_text_encoders(self, device: torch.device) -> None:
        for encoder in self.text_encoders:
            encoder.to(device)

    # ------------------------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluation_loss(self, num_draws: int = 8, seed: int = 1234) -> float:
        """Mean masked denoising loss over the training images with their (trigger) captions, on ``num_draws``
        fixed (noise, timestep) draws per image: the same draws for the same seed, whatever the model state."""
        generator = torch.Generator().manual_seed(seed)
        self.unet.eval()
        losses = []
        for index in range(len(self.dataset)):
            batch = self.dataset.batch([index] * num_draws, [False] * num_draws)
            noise = torch.randn(batch["latents"].shape, generator=generator)
            timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (num_draws,),
                                      generator=generator)
            device = self.runtime.device
            losses.append(self.denoising_losses(batch["latents"].to(device), batch["masks"].to(device),
                                                batch["captions"], batch["time_ids"].to(device), noise.to(device),
                                                timesteps.to(device)).mean().item())
        self.unet.train()
        return float(np.mean(losses))

    @torch.no_grad()
    def render_samples(self, tag: str, out_dir: Path | None = None) -> list[Path]:
        """Render the validation prompts with the in-memory pipeline into ``samples/`` of ``out_dir`` (default: the
        artifact folder)."""
        s = self.settings
        if not s.validation_prompts or not self.accelerator.is_main_process:
            return []
        folder = (out_dir or self.output_dir) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        height, width = (int(v) for v in self.dataset.items[0].time_ids[4:6])
        encoders_device = self.text_encoders[0].device
        self._move_text_encoders(self.runtime.device)
        self.unet.eval()
        paths = []
        with torch.random.fork_rng(devices=[]), self.runtime.autocast():  # frozen weights may be half precision
            for index, prompt in enumerate(s.validation_prompts):
                generator = self.runtime.generator(s.seed + index)
                image = self.pipe(replace_trigger_words(prompt, self.plan.triggers), height=height, width=width,
                                  num_inference_steps=s.validation_num_inference_steps, generator=generator).images[0]
                path = folder / f"{tag}-{index}.png"
                image.save(path)
                paths.append(path)
        self.unet.train()
        self._move_text_encoders(encoders_device)
        return paths

    # ------------------------------------------------------------------------------------------ checkpoints

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        """The UNet parameters being trained and, with train_text_encoder, the text-encoder LoRA factors (under
        ``text_encoder.``/``text_encoder_2.``, frozen or not)."""
        state = {name: p.detach() for name, p in self.unet.named_parameters() if p.requires_grad}
        if self.text_encoder_lora is not None:
            state.update({name: p.detach() for name, p in self.text_encoder_lora.named_parameters().items()})
        return state

    def _save_checkpoint(self) -> None:
        if self.accelerator.is_main_process:
            save_checkpoint(self.checkpoint_dir, Checkpoint(
                step=self.step, trainable=self._trainable_state(), embeddings=self.embeddings.embeddings(),
                optimizer_state=self.optimizer.state_dict(), scheduler_state=self.lr_scheduler.state_dict(),
                rng=capture_rng(), loss_history=self.loss_history))
            self._save_step_weights()
        self.accelerator.wait_for_everyone()

    def _save_step_weights(self) -> None:
        """``steps/<step>/``: this step's validation samples and, in a LoRA run, its weights in every format of the
        final ones (a full fine-tune's whole UNet per step would multiply the tar's size: samples only)."""
        from pti.formats import steps

        folder = steps.step_folder(self.output_dir, self.step)
        samples = self.render_samples(f"step-{self.step:06d}", folder)
        self.step_samples[self.step] = samples
        if self.settings.is_lora:
            self._write_weights(folder, {**self.training_config(), "step": self.step})

    def _load_checkpoint(self, folder: Path) -> None:
        checkpoint = load_checkpoint(folder)
        if checkpoint.step >= self.plan.total_steps:
            raise SettingsError(f"resume_from {folder} is at step {checkpoint.step}, not before the run's last step "
                                f"{self.plan.total_steps}; raise max_train_steps")
        params = dict(self.unet.named_parameters())
        unknown = sorted(set(checkpoint.trainable) ^ set(self._trainable_state()))
        if unknown:
            raise SettingsError(f"resume_from {folder} was trained with other UNet settings (e.g. {unknown[0]}); "
                                "use the same is_lora/lora_rank/targets/train_text_encoder/text_encoder_lora_rank")
        text_encoder_names = set(self.text_encoder_lora.named_parameters()) if self.text_encoder_lora else set()
        with torch.no_grad():
            for name, value in checkpoint.trainable.items():
                if name not in text_encoder_names:
                    params[name].copy_(value)
        if self.text_encoder_lora is not None:
            self.text_encoder_lora.load_state({k: v for k, v in checkpoint.trainable.items() if k in text_encoder_names})
        self.embeddings.load_embeddings(checkpoint.embeddings)
        self.optimizer.load_state_dict(checkpoint.optimizer_state)
        self.lr_scheduler.load_state_dict(checkpoint.scheduler_state)
        restore_rng(checkpoint.rng)
        self.step = checkpoint.step
        self.loss_history = list(checkpoint.loss_history)

    # ------------------------------------------------------------------------------------------------- output

    def _summary_writer(self):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.output_dir / "logs"))

    def training_config(self) -> dict:
        """Every setting and what it implied; export adds the library versions."""
        return {
            "settings": self._settings_config(),
            "base_model": self.base_source.url or self.base_source.name,
            "base_model_source": self.base_source.as_config(),
            "num_images": len(self.dataset),
            "total_steps": self.plan.total_steps,
            "pivot_step": self.plan.pivot_step,
            "text_encoder_stop_step": self.plan.text_encoder_stop_step if self.settings.train_text_encoder else None,
            "samples_per_epoch": self.plan.samples_per_epoch,
            "steps_per_epoch": self.plan.steps_per_epoch,
            "epochs": self.plan.total_steps / self.plan.steps_per_epoch,
            "concepts": self.plan.concepts(self.settings.repeats),
            "class_images": (class_image_counts(self.plan.class_items, Path(self.settings.class_data_dir))
                             if self.settings.class_data_dir is not None else None),
            "num_processes": self.accelerator.num_processes,
            "special_params": special_params(self.plan.triggers),
            "lora_norms": self.norm_stats.as_config() if self.norm_stats is not None else None,
        }

    @functools.cached_property
    def base_source(self) -> BaseModelSource:
        """Name, URL and SHA-256 of the base model (a single file is hashed once per run)."""
        return base_model.base_model_source(self.settings.base_model)

    def _settings_config(self) -> dict:
        """The settings as recorded, with a base-model URL's query string (a signed URL's token) left out."""
        config = self.settings.as_config()
        if config["base_model"] is not None:
            config["base_model"] = self.base_source.url or config["base_model"]
        if isinstance(config["inputs"], dict) and config["inputs"].get("base_model"):
            config["inputs"] = {**config["inputs"], "base_model": config["base_model"]}
        return config

    def export(self) -> TrainingResult:
        """Final samples, loss curve, the steps' contact sheet and the weight files/model card (main process
        only)."""
        from pti.formats import export, steps
        s = self.settings
        params = special_params(self.plan.triggers)
        embeddings = self.embeddings.embeddings()
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.sample_images = self.render_samples("final")
            draw_loss_curve(self.loss_history, self.output_dir / "loss.png", self.plan.pivot_step)
            self._write_steps_contact_sheet()
            saved = steps.saved_steps(self.output_dir) if s.is_lora else []
            config = {**self.training_config(), "saved_steps": saved}
            self._write_weights(self.output_dir, config)
            export.write_model_card(self.output_dir, special_params=params, base_model=config["base_model"],
                                    name=s.name, sample_images=self.sample_images, training_config=config)
        self.accelerator.wait_for_everyone()
        return TrainingResult(self.output_dir, self.plan.total_steps, self.plan.pivot_step, list(self.loss_history),
                              self.sample_images, params, embeddings)

    def _write_weights(self, folder: Path, config: dict) -> None:
        """The weight files of the current state (final or an intermediate step) into ``folder``."""
        from peft import get_peft_model_state_dict

        from pti.formats import export
        s = self.settings
        export.write_weight_files(
            folder,
            unet_lora_state=get_peft_model_state_dict(self.unet) if s.is_lora else None,
            lora_alpha=s.alpha if s.is_lora else None,
            text_encoder_loras=self.text_encoder_lora.loras() if self.text_encoder_lora is not None else None,
            embeddings=self.embeddings.embeddings(), special_params=special_params(self.plan.triggers),
            training_config=config, name=s.name, unet_layout=UNetLayout.from_unet_config(self.unet.config),
            full_checkpoint_state=None if s.is_lora else self._full_checkpoint_state(),
            save_precision=s.save_precision,
        )

    def _full_checkpoint_state(self) -> dict[str, torch.Tensor]:
        """A full fine-tune as one SGM-layout SDXL file: the trained UNet with the base VAE and text encoders (their
        token tables cut back to the base vocabulary; the new tokens are in the embeddings file), in the save
        precision."""
        from pti.formats.sgm_checkpoint import SdxlShape, sgm_state

        pipe = self.pipe
        return sgm_state(unet=self.unet.state_dict(), vae=pipe.vae.state_dict(),
                         text_encoder=pipe.text_encoder.state_dict(), text_encoder_2=pipe.text_encoder_2.state_dict(),
                         shape=SdxlShape.from_configs(self.unet.config, pipe.vae.config),
                         vocab_rows=tuple(int(ids.min()) for ids in self.embeddings.token_ids),
                         dtype=SAVE_PRECISIONS[self.settings.save_precision])

    def _write_steps_contact_sheet(self) -> None:
        """``steps/contact_sheet.png``: a row of samples per saved step and one for the final weights."""
        from pti.formats import steps

        rows = [steps.SheetRow(f"step {step}", images) for step, images in sorted(self.step_samples.items()) if images]
        if rows and self.sample_images:
            rows.append(steps.SheetRow(f"final ({self.plan.total_steps})", self.sample_images))
            steps.write_steps_contact_sheet(rows, list(self.settings.validation_prompts),
                                            self.output_dir / steps.STEPS_DIR / steps.CONTACT_SHEET_FILE)


def draw_loss_curve(losses: list[float], path: Path, pivot_step: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = np.arange(1, len(losses) + 1)
    axes.plot(steps, losses, linewidth=0.8, alpha=0.5, label="loss")
    if len(losses) >= 10:
        window = max(2, len(losses) // 20)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        axes.plot(steps[window - 1:], smooth, linewidth=1.5, label=f"mean of {window}")
    if 0 < pivot_step < len(losses):
        axes.axvline(pivot_step, color="grey", linestyle="--", linewidth=1, label="pivot")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.legend(loc="upper right")
    figure.tight_layout()
    staging = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(staging)
    plt.close(figure)
    staging.replace(path)


def _training_noise_scheduler(scheduler):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler.config)


def _from_main_process(seed: int, run_id: str) -> tuple[int, str]:
    """The main process's seed and run id, for every process: a seed drawn per process (train.py's default) would
    give the replicas different new-token rows and data orders."""
    from accelerate.utils import broadcast_object_list

    seed, run_id = broadcast_object_list([int(seed), str(run_id)])
    return int(seed), str(run_id)


def _check_min_snr(gamma: float | None, prediction_type: str) -> None:
    """Min-SNR weighting is defined for epsilon and v-prediction; a base model predicting something else is refused
    before the first step."""
    if gamma is not None and prediction_type not in MIN_SNR_PREDICTION_TYPES:
        raise SettingsError(f"min_snr_gamma works with epsilon or v_prediction models; this base model predicts "
                            f"{prediction_type!r}: leave min_snr_gamma empty")


def check_runtime(settings: TrainingSettings) -> base_model.Runtime:
    """The runtime the settings ask for, refusing (one line, before any preprocessing or model load) what cannot
    run on it, such as optimizer=adamw8bit off CUDA or without bitsandbytes."""
    runtime = base_model.pick_runtime(settings.precision, settings.device)
    check_optimizer_available(settings.optimizer, runtime.device)
    return runtime


def needs_loss_scaling(runtime: base_model.Runtime) -> bool:
    """fp16 gradients underflow without a loss scale; bf16 and float32 have float32's exponent range."""
    return runtime.dtype == torch.float16


def class_image_indices(missing: int, rank: int, processes: int) -> list[int]:
    """The class images process ``rank`` of ``processes`` renders: every ``processes``-th from ``rank``."""
    return list(range(rank, missing, processes))


@dataclass(frozen=True)
class SampleKey:
    """One sample of one optimizer step, named by its place in the step's global batch rather than by the process
    that trains it: the key its random draws come from."""

    INSTANCE = 0  # stream: a training image
    CLASS = 1  # stream: the class image drawn next to it (prior preservation)

    seed: int
    step: int
    slot: int  # (micro-step x processes + process index) x train_batch_size + index in the process's batch
    stream: int

    def _entropy(self) -> int:
        return int(np.random.SeedSequence([self.seed, self.step, self.slot, self.stream]).generate_state(1)[0])

    def python_rng(self) -> random.Random:
        """Flip and caption augmentation."""
        return random.Random(self._entropy())

    def torch_generator(self) -> torch.Generator:
        """Noise and timestep (a different stream from :meth:`python_rng`'s)."""
        return torch.Generator().manual_seed(self._entropy() + 1)


@lru_cache(maxsize=64)
def _epoch_batches(seed: int, epoch: int, sizes: tuple[tuple[int, int], ...], batch_size: int,
                   repeats: tuple[int, ...] | None = None) -> tuple[tuple[int, ...], ...]:
    """One epoch as batches of ``batch_size`` items of one size each (a bucket's last batch wraps around within the
    bucket), in an order shuffled by (seed, epoch); item ``i`` appears ``repeats[i]`` times (default once)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    repeats = repeats or (1,) * len(sizes)
    batches = []
    for size in sorted(set(sizes)):
        members = [index for index, item_size in enumerate(sizes) if item_size == size
                   for _ in range(repeats[index])]
        order = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
        count = math.ceil(len(order) / batch_size)
        wrapped = (order * math.ceil(count * batch_size / len(order)))[: count * batch_size]
        batches += [tuple(wrapped[k * batch_size:(k + 1) * batch_size]) for k in range(count)]
    return tuple(batches[i] for i in torch.randperm(len(batches), generator=generator).tolist())
