"""Cog ``train()``: photos in, ``trained_model.tar`` out (inputs of replicate/cog-sdxl, plus pivotal-tuning options).

Flow: preprocess the upload into a dataset folder → :func:`trainer.train_model` → :func:`export.pack_tar`.
Callable from plain Python too (tests, ``cog_local.py``): arguments left out take their ``Input`` default.
Under ``accelerate launch`` / ``torchrun`` (one machine) all processes share the main process's work folder: the
main process preprocesses the upload once, on its own device, while the others wait for it on the file system;
every process trains its slice of each batch; only the main process writes the tar (the others return the same
path) and cleans up. A failed run raises :class:`failures.RunFailed` (one line) and leaves no work folder behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path as PlainPath
from typing import Optional

from accelerate import PartialState
from cog import BaseModel, Input, Path
from cog.input import FieldInfo

from pti.formats import export
from pti.training import failures
import preprocess
from pti.preprocessing.captioning import DEFAULT_CAPTIONER
from dataset_and_utils import parse_token_string
from pti.models import single_file
from pti.models.base_model import checked_base_file, model_spec, pick_runtime, release_cached_memory
from pti.training.optim import OPTIMIZERS, SCHEDULERS
from pti.formats.export import SAVE_PRECISIONS
from pti.training.process_sync import SharedStep
from pti.training.trainer import (
    DEFAULT_LORA_TARGETS,
    DEFAULT_PRODIGY_D_COEF,
    DEFAULT_PYRAMID_DISCOUNT,
    DEFAULT_TEXT_ENCODER_LR,
    DEFAULT_TEXT_ENCODER_WEIGHT_DECAY,
    MAX_D_COEF,
    MAX_PYRAMID_ITERATIONS,
    SettingsError,
    TrainingSettings,
    check_runtime,
    train_model,
)


TAR_NAME = "trained_model.tar"
logger = logging.getLogger(__name__)


class TrainingOutput(BaseModel):
    weights: Path


def train(
    input_images: Path = Input(description="A .zip or .tar file (or folder) of the images to fine-tune on; "
                               "captions may come as <image>.txt files or a caption.csv (image_file,caption) beside "
                               "them. Several concepts: one folder each, named <repeats>_<trigger> <class> (kohya: "
                               "10_TOK person) or <trigger>"),
    seed: Optional[int] = Input(description="Random seed for reproducible training. Leave empty to use a random seed",
                                default=None),
    resolution: int = Input(description="Square pixel resolution which your images will be resized to for training",
                            default=768, ge=64, le=4096),
    train_batch_size: int = Input(description="Batch size (per device) for training", default=4, ge=1),
    num_train_epochs: int = Input(description="Number of epochs to loop through your training dataset", default=4000, ge=1),
    max_train_steps: int = Input(description="Number of individual training steps. Takes precedence over "
                                 "num_train_epochs", default=1000, ge=1),
    is_lora: bool = Input(description="Whether to use LoRA training. If set to False, will use Full fine tuning",
                          default=True),
    unet_learning_rate: float = Input(description="Learning rate for the U-Net (full fine-tune). We recommend "
                                      "1e-6 to 1e-5.", default=1e-6, ge=0.0),
    ti_lr: float = Input(description="Learning rate for the new-token (textual inversion) embeddings", default=3e-4, ge=0.0),
    lora_lr: float = Input(description="Learning rate for the LoRA weights", default=1e-4, ge=0.0),
    lora_rank: int = Input(description="Rank of the LoRA", default=32, ge=1, le=1024),
    lr_scheduler: str = Input(description="Learning rate scheduler", default="constant", choices=list(SCHEDULERS)),
    lr_warmup_steps: int = Input(description="Number of warmup steps for the learning-rate schedule", default=100, ge=0),
    token_string: str = Input(description="A unique word that will be trained to refer to the concept in the input "
                              "images (TOK works well). Several concepts: TOK:2,STY:1 (word:number of new tokens)",
                              default="TOK"),
    caption_prefix: str = Input(description="Text used as prefix of every caption; must contain the token_string, "
                                "e.g. 'a photo of TOK, '", default="a photo of TOK, "),
    mask_target_prompts: Optional[str] = Input(description="Prompt describing the important part of the images "
                                               "(e.g. 'photo of a dog'): CLIPSeg masks focus the loss there",
                                               default=None),
    crop_based_on_salience: bool = Input(description="Crop the images around the important (masked/face) region "
                                         "instead of the centre", default=True),
    use_face_detection_instead: bool = Input(description="Mask faces (face detection) instead of CLIPSeg prompts; "
                                             "recommended for people", default=False),
    clipseg_temperature: float = Input(description="How blurry the CLIPSeg mask is (0.5 to 1.0 recommended)",
                                       default=1.0, ge=0.01),
    verbose: bool = Input(description="verbose output (progress bars)", default=True),
    checkpointing_steps: int = Input(description="Steps between resumable checkpoints and validation samples; a "
                                     "LoRA run also keeps each such step's weights in the tar (steps/<step>/) for "
                                     "the predictor's replicate_weights=<tar>#step=<step> (a very high number "
                                     "disables them)", default=999999, ge=1),
    input_images_filetype: str = Input(description="Filetype of input_images: zip, tar, or infer (the content "
                                       "decides)", default="infer", choices=["zip", "tar", "infer"]),
    # ---- options beyond replicate/cog-sdxl
    ti_frac: float = Input(description="Fraction of the steps during which the new-token embeddings train (pivotal "
                           "tuning); afterwards only the UNet trains", default=0.5, ge=0.0, le=1.0),
    num_new_tokens: int = Input(description="New tokens per trigger word (<s0><s1>…)", default=2, ge=1),
    repeats: int = Input(description="Times each image is seen per epoch, multiplying a concept folder's own "
                         "repeats (10_TOK person: 10)", default=1, ge=1),
    token_init_word: Optional[str] = Input(description="Initialise the new tokens from this word's embedding "
                                           "instead of random rows", default=None),
    lora_alpha: Optional[float] = Input(description="LoRA alpha (scale alpha/rank); empty: equal to lora_rank",
                                        default=None),
    lora_dropout: float = Input(description="Dropout inside the LoRA layers (kohya's network_dropout; 0.1 is a "
                                "common start against overfitting)", default=0.0, ge=0.0, le=0.99),
    lora_target_modules: str = Input(description="Comma-separated UNet module names the LoRA adapts",
                                     default=",".join(DEFAULT_LORA_TARGETS)),
    use_dora: bool = Input(description="Weight-decomposed LoRA (DoRA); its weights are written for diffusers only "
                           "(no other tool applies PEFT's DoRA as trained)", default=False),
    scale_weight_norms: float = Input(description="Max-norm regularisation (kohya's scale_weight_norms; 1 is the "
                                      "usual choice): after every step, each LoRA module's weight change is scaled "
                                      "back to at most this norm (0: off)", default=0.0, ge=0.0, le=100.0),
    train_text_encoder: bool = Input(description="Also train LoRA adapters on both text encoders (diffusers' "
                                     "--train_text_encoder; kohya trains them by default), beside or, with "
                                     "ti_frac=0, instead of the new-token embeddings; every LoRA file carries them",
                                     default=False),
    text_encoder_lr: float = Input(description="train_text_encoder: learning rate of the text-encoder LoRA",
                                   default=DEFAULT_TEXT_ENCODER_LR, ge=0.0),
    text_encoder_lora_rank: Optional[int] = Input(description="train_text_encoder: rank of the text-encoder LoRA "
                                                  "(empty: lora_rank; its alpha is lora_alpha)", default=None, ge=1,
                                                  le=1024),
    text_encoder_frac: float = Input(description="train_text_encoder: fraction of the steps during which the "
                                     "text-encoder LoRA trains (kohya's stop_text_encoder_training); afterwards it "
                                     "stays as it is", default=1.0, ge=0.0, le=1.0),
    text_encoder_weight_decay: float = Input(description="train_text_encoder: weight decay of the text-encoder LoRA",
                                             default=DEFAULT_TEXT_ENCODER_WEIGHT_DECAY, ge=0.0, le=1.0),
    ti_weight_decay: float = Input(description="Weight decay of the new-token embeddings", default=0.0, ge=0.0,
                                   le=1.0),
    lora_weight_decay: float = Input(description="Weight decay of the LoRA weights (0.01-0.1 with prodigy)",
                                     default=1e-4, ge=0.0, le=1.0),
    save_precision: str = Input(description="Precision of the weight files (fp16: half the size of fp32)",
                                default="fp16", choices=list(SAVE_PRECISIONS)),
    optimizer: str = Input(description="adamw; prodigy (learning rates are found automatically); adamw8bit (CUDA "
                           "with bitsandbytes)", default="adamw", choices=list(OPTIMIZERS)),
    prodigy_d_coef: float = Input(description="optimizer=prodigy: multiplies the step size Prodigy estimates (0.5: "
                                  "half, 2: double)", default=DEFAULT_PRODIGY_D_COEF, ge=0.01, le=MAX_D_COEF),
    gradient_accumulation_steps: int = Input(description="Micro-batches per optimizer step", default=1, ge=1),
    max_grad_norm: float = Input(description="Gradient clipping norm (0: no clipping)", default=1.0, ge=0.0),
    min_snr_gamma: Optional[float] = Input(description="Min-SNR loss weighting gamma (5 is common); empty: off",
                                           default=None, ge=0.01, le=100.0),
    noise_offset: float = Input(description="Noise offset (0.05-0.1 helps very dark/bright images)", default=0.0,
                                ge=0.0, le=1.0),
    pyramid_noise_iterations: int = Input(description="Multi-resolution (pyramid) noise levels, kohya's "
                                          "multires_noise_iterations (6-10 is usual; 0: off)", default=0, ge=0,
                                          le=MAX_PYRAMID_ITERATIONS),
    pyramid_noise_discount: float = Input(description="Weight of each coarser pyramid-noise level relative to the "
                                          "one before (kohya's multires_noise_discount; needs "
                                          "pyramid_noise_iterations)", default=DEFAULT_PYRAMID_DISCOUNT, ge=0.01,
                                          le=1.0),
    caption_dropout: float = Input(description="Probability of training a step on the empty caption", default=0.0,
                                   ge=0.0, le=1.0),
    caption_shuffle: bool = Input(description="Shuffle comma-separated caption tags (keeping the first keep_tokens)",
                                  default=False),
    keep_tokens: int = Input(description="Leading caption tags kept in place by caption_shuffle", default=1, ge=0),
    flip_augmentation: bool = Input(description="Randomly mirror images horizontally", default=False),
    color_aug_copies: int = Input(description="Colour augmentation (kohya's color_aug): each image is also cached as "
                                  "this many copies with a random hue turn of up to ±16°, and every sample draws the "
                                  "original or a copy (0: off)", default=0, ge=0, le=16),
    class_images: Optional[Path] = Input(description="Prior preservation: .zip/.tar of class images (subfolders "
                                         "such as kohya's 1_person/ and captions as for input_images); needs "
                                         "class_prompt", default=None),
    class_prompt: Optional[str] = Input(description="Prior preservation: prompt of the class (e.g. 'a photo of a "
                                        "dog'); enables prior preservation", default=None),
    num_class_images: int = Input(description="Prior preservation: generate class images with the base model until "
                                  "there are this many", default=0, ge=0),
    prior_loss_weight: float = Input(description="Prior preservation: weight of the class-image loss", default=1.0,
                                     ge=0.0),
    use_bucketing: bool = Input(description="Keep aspect ratios (SDXL buckets) instead of square crops",
                                default=False),
    bucket_min_side: Optional[int] = Input(description="use_bucketing: no bucket with a shorter side than this "
                                           "(kohya's min_bucket_reso; empty: no bound)", default=None, ge=64),
    bucket_max_side: Optional[int] = Input(description="use_bucketing: no bucket with a longer side than this "
                                           "(kohya's max_bucket_reso; empty: no bound)", default=None, ge=64),
    max_upscale: float = Input(description="Photos that would have to be enlarged more than this factor to reach "
                               "the training size are skipped (raise it to use them anyway)", default=4.0, ge=1.0),
    captioning_model: str = Input(description="Captioning model for images without captions (empty: "
                                  "caption_prefix only)", default=DEFAULT_CAPTIONER),
    gradient_checkpointing: Optional[bool] = Input(description="Trade compute for memory; empty: on only when a "
                                                   "training step would not fit in free memory", default=None),
    validation_prompts: str = Input(description="Prompts rendered into samples/ at checkpoints and at the end, "
                                    "separated by '|' (empty: none)", default="a photo of TOK"),
    validation_num_inference_steps: int = Input(description="Denoising steps of the validation samples",
                                                default=25, ge=1),
    resume_from: Optional[str] = Input(description="Resume an interrupted run (same inputs): a local checkpoint "
                                       "folder, or the checkpoints folder the interrupted run logged", default=None),
    base_model: Optional[str] = Input(description="Base model to train on: a Hugging Face repo id, a diffusers "
                                      "folder, or an SDXL single-file checkpoint (.safetensors in the SGM/A1111 "
                                      "layout, e.g. from civitai) as a local path or https URL; empty: SDXL base "
                                      "(env SDXL_MODEL)", default=None),
) -> TrainingOutput:
    args = {name: _plain(value) for name, value in locals().items()}
    state = PartialState(cpu=pick_runtime().device.type == "cpu")  # the process group, under torchrun
    work = _shared_work_folder(state)
    try:
        with failures.stage("checking the settings"):
            settings = _training_settings(args, work)
            settings.validate()  # cheap checks before the (slow) preprocessing
            _check_base_model(settings.base_model)
            check_runtime(settings)  # e.g. adamw8bit without CUDA or bitsandbytes
        with failures.stage("preprocessing"):
            _preprocess_once(args, settings, state, work)
        with failures.stage("training"):
            result = train_model(settings)
        tar_path = work / TAR_NAME
        if state.is_main_process:  # under `accelerate launch` only the main process writes the artifact
            with failures.stage(f"writing {TAR_NAME}"):
                _add_dataset_preview(settings.dataset_dir, result.output_dir)
                export.pack_tar(result.output_dir, tar_path)
    except BaseException:
        if state.is_main_process:  # the work folder is the main process's; a failed run leaves nothing behind
            shutil.rmtree(work, ignore_errors=True)
        raise
    if state.is_main_process:
        SharedStep(work, "train", "preprocessing").clear()
        for leftover in (settings.dataset_dir, settings.output_dir, settings.checkpoint_dir, settings.class_data_dir):
            if leftover is not None:
                shutil.rmtree(leftover, ignore_errors=True)
    return TrainingOutput(weights=Path(tar_path))


def _shared_work_folder(state: PartialState) -> PlainPath:
    """A fresh work folder, created by the main process and shared by all (one machine): every process reads the
    same dataset and class-image folders."""
    folder = tempfile.mkdtemp(prefix="cog-sdxl-train-") if state.is_main_process else ""
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        folder = broadcast_object_list([folder])[0]
    return PlainPath(folder)


def _preprocess_once(args: dict, settings: TrainingSettings, state: PartialState, work: PlainPath) -> None:
    """The main process preprocesses the upload on its own device (not every process on GPU 0) and frees the
    captioner/masker memory before training; the others wait on the file system, holding no collective."""
    step = SharedStep(work, "train", "preprocessing")
    if not state.is_main_process:
        step.wait()
        return
    device = state.device if state.num_processes > 1 else pick_runtime().device
    try:
        preprocess.preprocess(PlainPath(args["input_images"]), settings.dataset_dir,
                              _preprocess_settings(args, str(device)))
        if settings.class_data_dir is not None:
            _prepare_class_images(args, settings.class_data_dir, str(device))
    except BaseException as error:
        if state.num_processes > 1:
            step.mark_failed(failures.explain(error, "preprocessing") if isinstance(error, Exception) else
                             type(error).__name__)
        raise
    finally:
        release_cached_memory(device)
    if state.num_processes > 1:
        step.mark_done()


def _training_settings(args: dict, work: PlainPath) -> TrainingSettings:
    if args["class_images"] is not None and not args["class_prompt"]:
        raise SettingsError("class_images needs class_prompt (e.g. 'a photo of a person'), which turns on prior "
                            "preservation")
    seed = args["seed"] if args["seed"] is not None else int.from_bytes(os.urandom(2), "big")
    return TrainingSettings(
        inputs={name: str(value) if isinstance(value, PlainPath) else value for name, value in args.items()},
        dataset_dir=work / "dataset",
        output_dir=work / "trained_model",
        checkpoint_dir=_checkpoint_dir(work),
        resume_from=PlainPath(args["resume_from"]) if args["resume_from"] else None,
        base_model=args["base_model"] or None,
        seed=seed,
        resolution=args["resolution"],
        train_batch_size=args["train_batch_size"],
        num_train_epochs=args["num_train_epochs"],
        max_train_steps=args["max_train_steps"],
        gradient_accumulation_steps=args["gradient_accumulation_steps"],
        max_grad_norm=args["max_grad_norm"] or None,
        token_string=args["token_string"],
        num_new_tokens=args["num_new_tokens"],
        repeats=args["repeats"],
        token_init_word=args["token_init_word"],
        caption_prefix=args["caption_prefix"],
        ti_frac=args["ti_frac"],
        ti_lr=args["ti_lr"],
        is_lora=args["is_lora"],
        lora_lr=args["lora_lr"],
        unet_learning_rate=args["unet_learning_rate"],
        lora_rank=args["lora_rank"],
        lora_alpha=args["lora_alpha"],
        lora_dropout=args["lora_dropout"],
        scale_weight_norms=args["scale_weight_norms"] or None,
        ti_weight_decay=args["ti_weight_decay"],
        train_text_encoder=args["train_text_encoder"],
        text_encoder_lr=args["text_encoder_lr"],
        text_encoder_lora_rank=args["text_encoder_lora_rank"],
        text_encoder_frac=args["text_encoder_frac"],
        text_encoder_weight_decay=args["text_encoder_weight_decay"],
        lora_weight_decay=args["lora_weight_decay"],
        prodigy_d_coef=args["prodigy_d_coef"],
        lora_target_modules=tuple(m.strip() for m in args["lora_target_modules"].split(",") if m.strip()),
        use_dora=args["use_dora"],
        save_precision=args["save_precision"],
        gradient_checkpointing=args["gradient_checkpointing"],
        optimizer=args["optimizer"],
        lr_scheduler=args["lr_scheduler"],
        lr_warmup_steps=args["lr_warmup_steps"],
        min_snr_gamma=args["min_snr_gamma"],
        noise_offset=args["noise_offset"],
        pyramid_noise_iterations=args["pyramid_noise_iterations"],
        pyramid_noise_discount=args["pyramid_noise_discount"],
        caption_dropout=args["caption_dropout"],
        caption_shuffle=args["caption_shuffle"],
        keep_tokens=args["keep_tokens"],
        flip_augmentation=args["flip_augmentation"],
        color_aug_copies=args["color_aug_copies"],
        class_data_dir=work / "class_images" if args["class_prompt"] else None,
        class_prompt=args["class_prompt"],
        prior_loss_weight=args["prior_loss_weight"],
        num_class_images=args["num_class_images"],
        checkpointing_steps=args["checkpointing_steps"],
        validation_prompts=tuple(p.strip() for p in args["validation_prompts"].split("|") if p.strip()),
        validation_num_inference_steps=args["validation_num_inference_steps"],
        show_progress=args["verbose"],
    )


def _check_base_model(spec: str | None) -> None:
    """A single-file base model is fetched (https: once, into the cache) and checked to be an SDXL checkpoint
    before any preprocessing or training."""
    if single_file.is_single_file(model_spec(spec)):
        checked_base_file(spec)


def _checkpoint_dir(work: PlainPath) -> PlainPath:
    """Checkpoints go to env ``COG_SDXL_CHECKPOINT_DIR`` (a disk that outlives the process, for resuming after a
    preemption) or else into the run's work folder, which is removed at the end."""
    root = os.environ.get("COG_SDXL_CHECKPOINT_DIR")
    folder = PlainPath(root) / work.name if root else work / "checkpoints"
    logger.info("checkpoints of this run: %s (resume with resume_from=%s)", folder, folder)
    return folder


def _add_dataset_preview(dataset_dir: PlainPath, output_dir: PlainPath) -> None:
    """The contact sheet of what the model learned from goes into the tar beside the weights."""
    preview = dataset_dir / "preview.png"
    if preview.is_file():
        shutil.copy2(preview, output_dir / "preview.png")


def _plain(value):
    """An argument's value; for a parameter left out in a plain-Python call, its ``Input`` default."""
    return value.default if isinstance(value, FieldInfo) else value


def _preprocess_settings(args: dict, device: str | None = None) -> preprocess.PreprocessSettings:
    triggers = tuple(trigger.word for trigger in parse_token_string(args["token_string"]))
    return preprocess.PreprocessSettings(
        device=device,
        resolution=args["resolution"],
        token_string=triggers[0],  # the trigger of caption_prefix and of images outside concept folders
        trigger_words=triggers[1:],
        caption_prefix=args["caption_prefix"],
        captioning_model=args["captioning_model"] or None,
        use_face_detection_instead=args["use_face_detection_instead"],
        mask_target_prompts=args["mask_target_prompts"],
        clipseg_temperature=args["clipseg_temperature"],
        crop_based_on_salience=args["crop_based_on_salience"],
        use_bucketing=args["use_bucketing"],
        bucket_min_side=args["bucket_min_side"],
        bucket_max_side=args["bucket_max_side"],
        max_upscale=args["max_upscale"],
        input_images_filetype=args["input_images_filetype"],
    )


def _class_preprocess_settings(args: dict, device: str | None = None) -> preprocess.PreprocessSettings:
    """Class images are cropped and bucketed like the instance images; their captions are their own (sidecar
    files, caption.csv) or class_prompt; kohya folders (1_person/) give repeats."""
    return preprocess.PreprocessSettings(
        device=device,
        resolution=args["resolution"],
        token_string="",
        class_images=True,
        caption_prefix=args["class_prompt"] or "",
        captioning_model=None,
        crop_based_on_salience=False,
        use_bucketing=args["use_bucketing"],
        bucket_min_side=args["bucket_min_side"],
        bucket_max_side=args["bucket_max_side"],
        max_upscale=args["max_upscale"],
        input_images_filetype=args["input_images_filetype"],
    )


def _prepare_class_images(args: dict, folder: PlainPath, device: str | None) -> None:
    """The uploaded class images (archive or folder, subfolders and captions included) as a dataset folder in
    ``folder``; without an upload an empty folder, which the trainer fills with generated images."""
    if args["class_images"] is None:
        folder.mkdir(parents=True, exist_ok=True)
        return
    try:
        preprocess.preprocess(PlainPath(args["class_images"]), folder, _class_preprocess_settings(args, device))
    except preprocess.PreprocessError as error:
        raise preprocess.PreprocessError(f"class_images: {error}") from None
