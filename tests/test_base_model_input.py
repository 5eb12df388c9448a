"""train(base_model=...) on a single-file SDXL checkpoint (issue 15, point 1): the tiny model written as one
SGM-layout file (a local path and an https URL) trains like its diffusers folder, the tar records the base (name,
URL, SHA-256) in training_config.json, the model card and the kohya metadata, the predictor logs a tar trained on
another base, and a file that is not an SDXL checkpoint is refused in one line before anything trains."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from misbehaving_server import MisbehavingServer
from training_fixtures import write_plain_folder
from weights_fixtures import one_torch_thread  # noqa: F401  (autouse fixture)

TRAIN = dict(seed=5, resolution=64, train_batch_size=1, max_train_steps=4, lora_rank=4, lora_lr=1e-2, ti_lr=1e-2,
             lr_warmup_steps=0, captioning_model="", crop_based_on_salience=False, verbose=False,
             validation_num_inference_steps=1)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("base-model")


@pytest.fixture(scope="module")
def photos(work) -> Path:
    folder = write_plain_folder(work / "photos", 3, size=64)
    archive = work / "photos.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for photo in folder.iterdir():
            handle.write(photo, photo.name)
    return archive


@pytest.fixture(scope="module")
def tiny_file(work) -> Path:
    """The tiny model as one SGM-layout checkpoint, written by the project's converter (float32: bit-identical)."""
    from diffusers import StableDiffusionXLPipeline

    from pti.formats.sgm_checkpoint import SdxlShape, sgm_state
    from pti.models.tiny_models import ensure_tiny_sdxl

    pipe = StableDiffusionXLPipeline.from_pretrained(ensure_tiny_sdxl())
    state = sgm_state(unet=pipe.unet.state_dict(), vae=pipe.vae.state_dict(),
                      text_encoder=pipe.text_encoder.state_dict(), text_encoder_2=pipe.text_encoder_2.state_dict(),
                      shape=SdxlShape.from_configs(pipe.unet.config, pipe.vae.config),
                      vocab_rows=(len(pipe.tokenizer), len(pipe.tokenizer_2)), dtype=torch.float32)
    path = work / "files" / "tiny_sdxl.safetensors"
    path.parent.mkdir()
    save_file(state, str(path))
    return path


def train_and_unpack(photos: Path, into: Path, **inputs) -> Path:
    import train

    output = train.train(input_images=photos, **TRAIN, **inputs)
    with tarfile.open(Path(output.weights)) as tar:
        tar.extractall(into, filter="data")
    return into


@pytest.fixture(scope="module")
def from_folder(photos, work) -> Path:
    return train_and_unpack(photos, work / "from-folder")


@pytest.fixture(scope="module")
def from_file(photos, work, tiny_file) -> Path:
    return train_and_unpack(photos, work / "from-file", base_model=str(tiny_file))


def test_single_file_trains_like_the_folder(from_folder, from_file):
    for name in ("embeddings.safetensors", "pytorch_lora_weights.safetensors"):
        folder, single = load_file(from_folder / name), load_file(from_file / name)
        assert set(folder) == set(single)
        for key, value in folder.items():
            # same weights (the file is the folder's float32 tensors), same seed: the same run up to kernel order
            torch.testing.assert_close(single[key], value, rtol=1e-5, atol=1e-6)


def test_the_tar_records_the_base_file(from_file, tiny_file):
    sha = hashlib.sha256(tiny_file.read_bytes()).hexdigest()
    config = json.loads((from_file / "training_config.json").read_text())
    assert config["base_model_source"] == {"name": "tiny_sdxl.safetensors", "url": None, "sha256": sha}
    for kohya_file in ("trained_model.safetensors", "trained_model_kohya.safetensors"):
        with safe_open(str(from_file / kohya_file), "pt") as handle:
            meta = handle.metadata()
        assert meta["ss_sd_model_name"] == "tiny_sdxl.safetensors" and meta["ss_new_sd_model_hash"] == sha
    assert "tiny_sdxl.safetensors" in (from_file / "README.md").read_text()


def test_an_https_url_is_downloaded_once_and_recorded_without_its_query(photos, work, tiny_file, monkeypatch):
    from pti.models import base_model

    monkeypatch.setenv("COG_SDXL_CACHE", str(work / "cache"))
    with MisbehavingServer(tiny_file.parent) as server:
        url = server.url("files/" + tiny_file.name)
        source = base_model.base_model_source(url + "?token=secret")
    assert source.url == url and source.name == tiny_file.name
    assert source.sha256 == hashlib.sha256(tiny_file.read_bytes()).hexdigest()
    assert len(list((work / "cache" / "base-models").glob("*.safetensors"))) == 1


def test_predictor_logs_a_tar_trained_on_another_base(from_file, caplog, tmp_path):
    from weights_manager import log_base_mismatch, served_base_name

    with caplog.at_level(logging.WARNING, logger="weights_manager"):
        log_base_mismatch(from_file, "trained.tar", served_base_name())
        log_base_mismatch(from_file, "same.tar", "tiny_sdxl.safetensors")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1
    assert "trained.tar were trained on base model tiny_sdxl.safetensors" in messages[0]
    assert "this predictor serves tiny" in messages[0]


@pytest.mark.parametrize("keys, message", [
    (["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.text_model.x",
      "first_stage_model.encoder.conv_in.weight"], "not an SDXL base checkpoint (a Stable Diffusion 1.x/2.x"),
    (["lora_unet_input_blocks_1_1_proj_in.lora_down.weight"], "not a whole-model checkpoint"),
    (["model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.0.model.ln_final.weight",
      "first_stage_model.encoder.conv_in.weight"], "missing the VAE or a text encoder"),
])
def test_a_file_that_is_not_an_sdxl_checkpoint_is_refused_before_training(photos, tmp_path, keys, message):
    import train
    from pti.training.failures import RunFailed

    path = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(1) for k in keys}, str(path))
    before = set(Path(os.environ.get("TMPDIR", "/tmp")).glob("cog-sdxl-train-*"))
    with pytest.raises(RunFailed) as error:
        train.train(input_images=photos, base_model=str(path), **TRAIN)
    text = str(error.value)
    assert "\n" not in text and f"base_model {path}" in text and message in text
    assert set(Path(os.environ.get("TMPDIR", "/tmp")).glob("cog-sdxl-train-*")) == before


def test_a_missing_file_is_refused_in_one_line(photos, tmp_path):
    import train
    from pti.training.failures import RunFailed

    with pytest.raises(RunFailed, match=r"base_model .*missing\.safetensors: no such file"):
        train.train(input_images=photos, base_model=str(tmp_path / "missing.safetensors"), **TRAIN)
