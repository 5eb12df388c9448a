"""The tar that ``train()`` returns, read back file by file with the public APIs people use (issue 2, point 1)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from exactness import assert_images_close, assert_same_state, effective_state
from pti.formats import lora_formats
from pti.models.base_model import load_sdxl_pipeline, pick_runtime
from training_fixtures import write_photo_zip

PROMPT = "a photo of <s0><s1> on a table"
CONTRACT_FILES = {"pytorch_lora_weights.safetensors", "embeddings.safetensors", "trained_model.safetensors",
                  "special_params.json", "training_config.json", "README.md", "loss.png", "preview.png"}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    import train

    work = tmp_path_factory.mktemp("trained")
    archive = write_photo_zip(work, 3, size=96)
    output = train.train(input_images=archive, seed=5, resolution=64, train_batch_size=1, max_train_steps=6,
                         lora_rank=4, lora_lr=1e-2, ti_lr=1e-2, lr_warmup_steps=0, captioning_model="",
                         crop_based_on_salience=False, verbose=False, validation_num_inference_steps=1)
    folder = work / "unpacked"
    with tarfile.open(Path(output.weights)) as tar:
        tar.extractall(folder, filter="data")
    return folder


@pytest.fixture(scope="module")
def pipe():
    return load_sdxl_pipeline("tiny", pick_runtime("fp32", "cpu"))


def render(pipe, prompt: str = PROMPT) -> np.ndarray:
    return pipe(prompt, num_inference_steps=2, height=64, width=64, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def load_embeddings(pipe, folder: Path, tokens: list[str]) -> None:
    emb = load_file(folder / "embeddings.safetensors")
    pipe.load_textual_inversion(emb["clip_l"], token=tokens, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(emb["clip_g"], token=tokens, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)


def unload_embeddings(pipe, tokens: list[str]) -> None:
    pipe.unload_textual_inversion(tokens=tokens, tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
    pipe.unload_textual_inversion(tokens=tokens, tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2)


def test_tar_holds_every_contract_file(artifact):
    present = {p.relative_to(artifact).as_posix() for p in artifact.rglob("*") if p.is_file()}
    assert CONTRACT_FILES <= present
    assert any(name.startswith("samples/") for name in present)
    assert any(name.startswith("logs/") for name in present)
    assert json.loads((artifact / "special_params.json").read_text()) == {"TOK": "<s0><s1>"}
    config = json.loads((artifact / "training_config.json").read_text())
    assert config["settings"]["seed"] == 5 and config["total_steps"] == 6
    assert config["settings"]["inputs"]["use_face_detection_instead"] is False  # preprocessing inputs too
    assert config["library_versions"]["diffusers"]


def test_each_file_loads_with_the_public_api_changes_the_image_and_unloads_exactly(pipe, artifact):
    tokens = ["<s0>", "<s1>"]
    base, base_state = render(pipe, "a photo of a dog"), effective_state(pipe)

    pipe.load_lora_weights(artifact)  # the diffusers/PEFT file
    with_diffusers_file = render(pipe, "a photo of a dog")
    pipe.unload_lora_weights()
    assert_same_state(effective_state(pipe), base_state, "after unloading the LoRA")
    assert_images_close(render(pipe, "a photo of a dog"), base)
    assert np.abs(with_diffusers_file - base).max() > 1e-3

    one_file = load_file(artifact / "trained_model.safetensors")
    layout = lora_formats.UNetLayout.from_unet_config(pipe.unet.config)
    pipe.load_lora_weights(lora_formats.kohya_file_for_diffusers(one_file, layout))  # the WebUI/ComfyUI file
    with_kohya_file = render(pipe, "a photo of a dog")
    pipe.unload_lora_weights()
    np.testing.assert_allclose(with_kohya_file, with_diffusers_file, atol=1e-5)

    base_trigger = render(pipe)
    load_embeddings(pipe, artifact, tokens)
    with_tokens = render(pipe)
    unload_embeddings(pipe, tokens)
    assert np.abs(with_tokens - base_trigger).max() > 1e-3
    assert_same_state(effective_state(pipe), base_state, "after unloading the embeddings")
    assert_images_close(render(pipe), base_trigger)
    assert_images_close(render(pipe, "a photo of a dog"), base)


def test_one_file_lora_bundles_the_embeddings_and_describes_itself(artifact):
    emb = load_file(artifact / "embeddings.safetensors")
    with safe_open(artifact / "trained_model.safetensors", "pt") as handle:
        metadata = handle.metadata()
        assert torch.equal(handle.get_tensor("bundle_emb.TOK.clip_l"), emb["clip_l"])
        assert torch.equal(handle.get_tensor("bundle_emb.TOK.clip_g"), emb["clip_g"])
        assert any(key.startswith("lora_unet_") and key.endswith(".alpha") for key in handle.keys())
    assert metadata["ss_network_dim"] == "4"
    assert metadata["modelspec.architecture"].startswith("stable-diffusion-xl")
    assert "TOK" in metadata["modelspec.trigger_phrase"]


def test_model_card_shows_the_trigger_and_how_to_load(artifact):
    card = (artifact / "README.md").read_text()
    assert "TOK" in card and "load_lora_weights" in card and "load_textual_inversion" in card
