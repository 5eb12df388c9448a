"""Full fine-tunes as single-file SDXL checkpoints (issue 15, point 4): the SGM layout the project writes loads back
in diffusers' single-file loader (what A1111/ComfyUI-compatible means here) at the tiny size and, key by key, at the
real SDXL architecture, fits under the predictor's download limit at full size, and a full fine-tune's tar from
train() loads in the predictor as the same UNet."""

from __future__ import annotations

import inspect
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
import safetensors.torch
from safetensors.torch import save_file

from exactness import assert_same_state, effective_state, images_differ
from pti.formats import sgm_checkpoint
from pti.formats.sgm_checkpoint import SdxlShape, sgm_state, sgm_tensors
from pti.inference.weights_cache import WeightsSettings
from training_fixtures import write_photo_zip
from weights_fixtures import one_torch_thread  # noqa: F401  (autouse fixture)

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def tiny():
    from diffusers import StableDiffusionXLPipeline

    from pti.models.tiny_models import ensure_tiny_sdxl

    return ensure_tiny_sdxl(), StableDiffusionXLPipeline.from_pretrained(ensure_tiny_sdxl())


def components(pipe) -> dict:
    return dict(unet=pipe.unet.state_dict(), vae=pipe.vae.state_dict(), text_encoder=pipe.text_encoder.state_dict(),
                text_encoder_2=pipe.text_encoder_2.state_dict(),
                shape=SdxlShape.from_configs(pipe.unet.config, pipe.vae.config),
                vocab_rows=(len(pipe.tokenizer), len(pipe.tokenizer_2)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_diffusers_single_file_loader_reads_back_every_component(tiny, tmp_path, dtype):
    from diffusers import StableDiffusionXLPipeline

    folder, pipe = tiny
    path = tmp_path / "tiny.safetensors"
    save_file(sgm_state(dtype=dtype, **components(pipe)), str(path))
    back = StableDiffusionXLPipeline.from_single_file(str(path), config=str(folder), local_files_only=True,
                                                      torch_dtype=torch.float32)
    for name in COMPONENTS:
        original, loaded = getattr(pipe, name).state_dict(), getattr(back, name).state_dict()
        assert set(loaded) == set(original), name
        for key, value in original.items():
            # fp16: the file holds the fp16 rounding of each weight, read back exactly
            assert torch.equal(loaded[key], value.to(dtype).float()), f"{name}.{key}"


def test_the_unet_reads_back_from_the_file_for_the_predictor(tiny):
    _, pipe = tiny
    state = sgm_state(dtype=torch.float32, **components(pipe))
    back = sgm_checkpoint.sgm_unet_state(state)
    original = pipe.unet.state_dict()
    assert set(back) == set(original) and all(torch.equal(back[k], original[k]) for k in original)


def test_real_sdxl_architecture_maps_key_by_key_and_fits_the_download_limit():
    """The exact SDXL base architecture on the meta device (no weights): every tensor gets an SGM name that diffusers
    recognises as SDXL base and converts back to the same diffusers names and shapes, and the fp16 file's size is
    under the predictor's download limit."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                      convert_open_clip_checkpoint, infer_diffusers_model_type)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from pti.models.full_random_model import CLIP_BIGG, CLIP_L, CLIP_VOCAB, SDXL_UNET, SDXL_VAE

    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**SDXL_UNET), AutoencoderKL(**SDXL_VAE)
        clip_l = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG))
    tensors = sgm_tensors(unet=unet.state_dict(), vae=vae.state_dict(), text_encoder=clip_l.state_dict(),
                          text_encoder_2=clip_g.state_dict(), shape=SdxlShape.from_configs(unet.config, vae.config),
                          vocab_rows=(CLIP_VOCAB, CLIP_VOCAB))
    assert infer_diffusers_model_type(tensors) == "xl_base"
    for original, converted in [(unet.state_dict(), convert_ldm_unet_checkpoint(tensors, unet.config)),
                                (vae.state_dict(), convert_ldm_vae_checkpoint(tensors, vae.config)),
                                (clip_g.state_dict(), convert_open_clip_checkpoint(
                                    clip_g, tensors, prefix=sgm_checkpoint.CLIP_G_PREFIX))]:
        assert set(converted) == set(original)
        assert all(tuple(converted[k].shape) == tuple(v.shape) for k, v in original.items())
    fp16_bytes = sum(t.numel() * 2 for t in tensors.values())
    assert 6.5e9 < fp16_bytes < WeightsSettings(cache_dir=Path()).max_download_bytes  # measured: 6.94 GB


def train_full_fine_tune(work: Path, **inputs) -> Path:
    import train

    archive = write_photo_zip(work, 3, size=64)
    output = train.train(input_images=archive, seed=5, resolution=64, train_batch_size=1, max_train_steps=3,
                         is_lora=False, unet_learning_rate=1e-3, ti_lr=1e-2, lr_warmup_steps=0, captioning_model="",
                         crop_based_on_salience=False, verbose=False, validation_num_inference_steps=1, **inputs)
    return Path(output.weights)


@pytest.fixture(scope="module")
def full_tar(tmp_path_factory) -> Path:
    return train_full_fine_tune(tmp_path_factory.mktemp("full"))


def checkpoint_dtypes(tar_path: Path) -> set[str]:
    with tarfile.open(tar_path) as tar:
        data = tar.extractfile("sdxl_checkpoint.safetensors").read()
    return {str(t.dtype) for t in safetensors.torch.load(data).values()}


def test_full_fine_tune_is_written_in_save_precision(full_tar, tmp_path):
    assert checkpoint_dtypes(full_tar) == {"torch.float16"}  # the default
    bf16_tar = train_full_fine_tune(tmp_path, save_precision="bf16")
    assert checkpoint_dtypes(bf16_tar) == {"torch.bfloat16"}


def test_full_fine_tune_tar_holds_an_fp16_single_file_that_loads_in_diffusers_and_the_predictor(full_tar, tiny,
                                                                                              tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from predict import Predictor

    folder, _ = tiny
    with tarfile.open(full_tar) as tar:
        names = set(tar.getnames())
        tar.extractall(tmp_path / "tar", filter="data")
    assert "sdxl_checkpoint.safetensors" in names and "unet.safetensors" not in names
    single = StableDiffusionXLPipeline.from_single_file(str(tmp_path / "tar" / "sdxl_checkpoint.safetensors"),
                                                        config=str(folder), local_files_only=True,
                                                        torch_dtype=torch.float32)
    assert single.unet.dtype == torch.float32
    os.environ["WEIGHTS_CACHE_DIR"] = str(tmp_path / "cache")
    try:
        predictor = Predictor()
        predictor.setup()
        defaults = {k: p.default.default for k, p in inspect.signature(Predictor.predict).parameters.items()
                    if k != "self"}
        fast = dict(width=64, height=64, num_inference_steps=2, seed=3, output_format="png", prompt="a photo of TOK")
        base = np.array(Image.open(predictor.predict(**{**defaults, **fast})[0]))
        trained = np.array(Image.open(predictor.predict(**{**defaults, **fast, "replicate_weights": str(full_tar)})[0]))
        assert images_differ(base, trained)
        unet_digests = {k: v for k, v in effective_state(predictor.models.txt2img).items() if k.startswith("unet.")}
        single_digests = {k: v for k, v in effective_state(single).items() if k.startswith("unet.")}
        assert_same_state(unet_digests, single_digests, "the predictor's UNet is the single file's")
    finally:
        os.environ.pop("WEIGHTS_CACHE_DIR")
