"""Text-encoder LoRA (issue 15, point 3) through train() and predict() as users call them, on the tiny SDXL: the
adapters train until their stop step and then stay bit-identical while the UNet goes on; the diffusers file loads with
diffusers' load_lora_weights and changes the prompt embeddings and the image (and the kohya file does the same); the
predictor applies them at lora_scale, beside other LoRAs, and unloads exactly; a resumed run matches an uninterrupted
one; bad settings are one line naming the input."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from exactness import assert_images_close, assert_same_state, effective_state, images_differ
from predict import default_inputs
from pti.formats.text_encoder_lora import is_diffusers_key, is_kohya_key
from pti.training.trainer import DEFAULT_TEXT_ENCODER_LR, SettingsError, Trainer, TrainingSettings
from training_fixtures import write_dataset_folder, write_photo_zip
from weights_fixtures import one_torch_thread  # noqa: F401  (autouse fixture)
from weights_fixtures import predictor_with_own_cache, write_trained_tar

# 6 steps; the embeddings train for steps 1-2 (ti_frac), the text-encoder LoRA for steps 1-3 (text_encoder_frac 0.5);
# steps 2 and 4 are saved.
INPUTS = dict(seed=5, resolution=64, train_batch_size=1, max_train_steps=6, checkpointing_steps=2, lora_rank=4,
              lora_lr=3e-2, ti_lr=3e-2, ti_frac=0.34, lr_warmup_steps=0, train_text_encoder=True,
              text_encoder_lr=3e-2, text_encoder_frac=0.5, captioning_model="", crop_based_on_salience=False,
              verbose=False, validation_prompts="a photo of TOK", validation_num_inference_steps=1)
FAST = dict(width=64, height=64, num_inference_steps=2, seed=3, output_format="png", prompt="a photo of TOK",
            guidance_scale=5.0, lora_scale=1.0, apply_watermark=False)
# A change the LoRA makes is orders of magnitude above float noise (the trained factors move by ~1e-2 per step at
# these learning rates); one fp16 file against another holding the same fp16 tensors is the same arithmetic.
CHANGED = 1e-3


@pytest.fixture(scope="module")
def trained_tar(tmp_path_factory) -> Path:
    import train

    work = tmp_path_factory.mktemp("te")
    archive = write_photo_zip(work, 3, size=64)
    return Path(train.train(input_images=archive, **INPUTS).weights)


@pytest.fixture(scope="module")
def unpacked(trained_tar, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("unpacked")
    with tarfile.open(trained_tar) as tar:
        tar.extractall(folder, filter="data")
    return folder


def text_encoder_tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(path).items() if is_diffusers_key(k)}


def unet_tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(path).items() if k.startswith("unet.")}


def differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    assert a.keys() == b.keys()
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_the_text_encoder_lora_trains_until_its_stop_step_and_then_stays_while_the_unet_goes_on(unpacked):
    files = {step: unpacked / "steps" / f"{step:06d}" / "pytorch_lora_weights.safetensors" for step in (2, 4)}
    files[6] = unpacked / "pytorch_lora_weights.safetensors"
    text = {step: text_encoder_tensors(path) for step, path in files.items()}
    unet = {step: unet_tensors(path) for step, path in files.items()}
    assert {k.split(".")[0] for k in text[6]} == {"text_encoder", "text_encoder_2"}
    assert len(text[6]) == 2 * 2 * 4 * 3, "2 encoders x A/B x q/k/v/out x 3 tiny layers"
    # SDXL reads the first encoder's penultimate hidden states: its last layer gets no gradient (as in diffusers' and
    # kohya's trainers, which adapt it too); every other up factor trained.
    dead = "text_encoder.text_model.encoder.layers.2."
    assert all((v.abs().max() > 0) != k.startswith(dead) for k, v in text[6].items() if "lora_B" in k)
    assert differ(text[2], text[4]), "step 3 still trains the text-encoder LoRA"
    assert not differ(text[4], text[6]), "after its stop step (3) it is bit-identical"
    assert differ(unet[4], unet[6]), "the UNet LoRA goes on training"
    config = json.loads((unpacked / "training_config.json").read_text())
    assert config["text_encoder_stop_step"] == 3 and config["pivot_step"] == 2
    assert config["settings"]["train_text_encoder"] is True and config["settings"]["text_encoder_frac"] == 0.5


def test_the_kohya_files_hold_lora_te1_and_lora_te2_keys(unpacked):
    for name in ("trained_model.safetensors", "trained_model_kohya.safetensors"):
        with safe_open(unpacked / name, "pt") as handle:
            keys, metadata = list(handle.keys()), handle.metadata()
        layers = {k.split(".")[0] for k in keys if is_kohya_key(k)}
        assert {layer[:9] for layer in layers} == {"lora_te1_", "lora_te2_"} and len(layers) == 2 * 4 * 3, name
        assert metadata["ss_network_train_unet_only"] == "False"
    card = (unpacked / "README.md").read_text()
    assert "The LoRA adapts both text encoders too" in card


def prompt_embeddings(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt("a photo of a dog", do_classifier_free_guidance=False)
    return embeds, pooled


def render(pipe) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe("a photo of a dog", height=64, width=64, num_inference_steps=2, generator=generator,
                output_type="np").images[0]


def test_diffusers_load_lora_weights_reads_the_text_encoder_keys_of_both_files(unpacked):
    from diffusers import StableDiffusionXLPipeline

    from pti.models.tiny_models import ensure_tiny_sdxl

    pipe = StableDiffusionXLPipeline.from_pretrained(ensure_tiny_sdxl())
    base_embeds, base_image = prompt_embeddings(pipe), render(pipe)
    pipe.load_lora_weights(str(unpacked), weight_name="pytorch_lora_weights.safetensors")
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        assert sum(".lora_A." in name for name, _ in encoder.named_parameters()) == 4 * 3
    loaded = prompt_embeddings(pipe)
    assert all((a - b).abs().max() > CHANGED for a, b in zip(loaded, base_embeds)), "embeddings and pooled change"
    assert images_differ(render(pipe), base_image)
    pipe.unload_lora_weights()
    assert all(torch.equal(a, b) for a, b in zip(prompt_embeddings(pipe), base_embeds))
    pipe.load_lora_weights(load_file(unpacked / "trained_model_kohya.safetensors"))
    for kohya, diffusers_file in zip(prompt_embeddings(pipe), loaded):
        torch.testing.assert_close(kohya, diffusers_file, rtol=1e-5, atol=1e-5)  # the same fp16 factors and alphas


# ---------------------------------------------------------------------------------------------- predictor


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    yield from predictor_with_own_cache(tmp_path_factory)


def image(predictor, **inputs) -> np.ndarray:
    (path,) = predictor.predict(**{**default_inputs(), **FAST, **inputs})
    return np.array(Image.open(path))


@pytest.fixture(scope="module")
def without_text_encoder(unpacked, tmp_path_factory) -> Path:
    """The same trained folder with the text-encoder keys taken out of its diffusers file."""
    folder = tmp_path_factory.mktemp("no_te") / "weights"
    shutil.copytree(unpacked, folder)
    path = folder / "pytorch_lora_weights.safetensors"
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    save_file({k: v for k, v in load_file(path).items() if not is_diffusers_key(k)}, path, metadata=metadata)
    return folder


def test_the_predictor_applies_the_text_encoder_lora_at_lora_scale_and_unloads_exactly(
        predictor, trained_tar, unpacked, without_text_encoder, tmp_path):
    pipe = predictor.models.txt2img
    base, base_state = image(predictor), effective_state(pipe)
    trained = image(predictor, replicate_weights=str(trained_tar))
    trained_state = effective_state(pipe)
    unet_only = image(predictor, replicate_weights=str(without_text_encoder))
    assert images_differ(trained, base) and images_differ(trained, unet_only), "the text encoders' LoRA takes part"
    module = pipe.text_encoder_2.get_submodule("text_model.encoder.layers.0.self_attn.q_proj")
    image(predictor, replicate_weights=str(trained_tar), lora_scale=0.5)
    (adapter,) = module.active_adapters
    assert module.scaling[adapter] == pytest.approx(0.5), "lora_scale times alpha/rank 1"
    # A -> B -> A -> none: the state of A alone, then the base, exactly.
    other = write_trained_tar(tmp_path, 3)
    assert images_differ(image(predictor, replicate_weights=str(other)), trained)
    assert_images_close(image(predictor, replicate_weights=str(trained_tar)), trained)
    assert_same_state(effective_state(pipe), trained_state, "A again after B")
    assert_images_close(image(predictor), base)
    assert_same_state(effective_state(pipe), base_state, "none after A, B, A")


def test_lora_change_reads_every_part_of_the_tar_and_the_text_encoders_move(predictor, trained_tar):
    """bench/lora_change.py on a real train() tar: the kohya file's UNet and both text-encoder parts, and a text
    change far above float noise on prompts without the trigger, with the weights unloaded afterwards."""
    from bench.lora_change import kohya_state, text_change
    from pti.formats.lora_change import change_by_part

    parts = {part.part: part for part in change_by_part(kohya_state(trained_tar))}
    assert list(parts) == ["unet", "te1", "te2"]
    assert all(part.largest >= part.median > CHANGED for part in parts.values())
    predictor.weights.use_all([])
    base_state = effective_state(predictor.models.txt2img)
    relative, pooled_cos = text_change(predictor, trained_tar, ["a photo of a dog", "a red house"])
    assert relative > CHANGED and pooled_cos < 1 - CHANGED
    assert_same_state(effective_state(predictor.models.txt2img), base_state, "unloaded after the measure")


def test_the_bare_kohya_file_with_its_embedding_draws_what_the_tar_draws_and_mixes_with_other_loras(
        predictor, trained_tar, unpacked, tmp_path):
    trained = image(predictor, replicate_weights=str(trained_tar))
    bare = image(predictor, replicate_weights=str(unpacked / "trained_model_kohya.safetensors"),
                 embeddings=str(unpacked / "embeddings" / "TOK.safetensors"))
    assert_images_close(bare, trained, "kohya lora_te1_/lora_te2_ keys applied like the tar's diffusers keys")
    other = write_trained_tar(tmp_path, 4)
    both = image(predictor, replicate_weights=str(other), extra_lora=str(trained_tar), extra_lora_scale=0.7)
    assert images_differ(both, image(predictor, replicate_weights=str(other)))
    active = {name: m for name, m in predictor.models.txt2img.text_encoder.named_modules() if name.endswith("q_proj")}
    assert all(len(m.active_adapters) == 1 for m in active.values()), "only the extra LoRA has text-encoder layers"


# ---------------------------------------------------------------------------------------------- resume, settings


def trainer_settings(dataset: Path, output: Path, **overrides) -> TrainingSettings:
    values = dict(dataset_dir=dataset, output_dir=output, resolution=64, train_batch_size=2, max_train_steps=6,
                  lora_rank=4, lora_lr=3e-3, ti_lr=1e-2, lr_warmup_steps=0, show_progress=False, seed=9,
                  validation_prompts=(), checkpointing_steps=2, ti_frac=0.34, train_text_encoder=True,
                  text_encoder_lr=1e-2, text_encoder_frac=0.67, lr_scheduler="cosine")
    values.update(overrides)
    return TrainingSettings(**values)


def test_a_resumed_text_encoder_lora_run_matches_an_uninterrupted_one(tmp_path):
    """Checkpoint 2 lies after the pivot (2) and before the text-encoder stop step (4): the resumed run trains the
    text-encoder LoRA two more steps, stops it and caches the encoders' outputs, as the first run did."""
    dataset = write_dataset_folder(tmp_path / "dataset", ["a photo of TOK", "TOK on a table", "TOK in the forest"])
    first = Trainer.create(trainer_settings(dataset, tmp_path / "first"))
    first.run()
    assert first.plan.text_encoder_stop_step == 4
    resumed = Trainer.create(trainer_settings(dataset, tmp_path / "resumed",
                                              resume_from=first.checkpoint_dir / "checkpoint-2"))
    resumed.run()
    # The tolerances of tests/test_trainer.py's resume test: the same float32 arithmetic, in the same order.
    assert resumed.loss_history == pytest.approx(first.loss_history, rel=1e-5)
    expected = first._trainable_state()
    assert any(name.startswith("text_encoder_2.") for name in expected)
    for name, value in resumed._trainable_state().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6)
    for key, value in resumed.embeddings.embeddings().items():
        torch.testing.assert_close(value, first.embeddings.embeddings()[key], rtol=1e-5, atol=1e-6)
    assert not resumed.text_encoder_lora.trainable and resumed.text_cache is not None


@pytest.mark.parametrize("overrides, message", [
    (dict(is_lora=False), "train_text_encoder trains LoRA adapters on the text encoders; it needs is_lora=true"),
    (dict(train_text_encoder=False, text_encoder_lr=1e-4), "text_encoder_lr applies to the text-encoder LoRA; set "
                                                           "train_text_encoder=true"),
    (dict(train_text_encoder=False, text_encoder_lr=DEFAULT_TEXT_ENCODER_LR, text_encoder_frac=0.5),
     "text_encoder_frac applies to the text-encoder LoRA"),
    (dict(text_encoder_frac=0.0), "text_encoder_frac must be above 0 and at most 1"),
    (dict(text_encoder_lora_rank=0), "text_encoder_lora_rank must be at least 1"),
    (dict(text_encoder_weight_decay=2.0), "text_encoder_weight_decay must be between 0 and 1"),
])
def test_bad_text_encoder_settings_are_one_line_naming_the_input(tmp_path, overrides, message):
    settings = trainer_settings(tmp_path / "dataset", tmp_path / "out", **overrides)
    with pytest.raises(SettingsError) as error:
        settings.validate()
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
