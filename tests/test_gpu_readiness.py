"""Issue 11, section 1: the GPU-path defects, each shown on the CPU where a CPU can show it (device capabilities,
CUDA RNG calls and out-of-memory errors faked where needed)."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from exactness import assert_images_close
from pti.inference import generation
from pti.models import base_model
from pti.training import checkpoints, memory_fit
from pti.training import trainer as trainer_module
from pti.training.failures import RunFailed
from pti.training.trainer import SettingsError, Trainer, TrainingSettings, class_image_indices
from training_fixtures import SIZE, single_torch_thread, write_dataset_folder

CAPTIONS = ["a photo of TOK", "TOK sitting on a table", "a close up photo of TOK", "TOK in the forest"]
MAX_NORM = 1e-3
one_thread = pytest.fixture(scope="module", autouse=True)(single_torch_thread)


def make_settings(dataset: Path, output: Path, **overrides) -> TrainingSettings:
    values = dict(dataset_dir=dataset, output_dir=output, base_model="tiny", precision="fp32", device="cpu",
                  resolution=SIZE, train_batch_size=2, max_train_steps=3, lora_rank=4, lora_lr=3e-3, ti_lr=1e-2,
                  lr_warmup_steps=0, validation_prompts=(), show_progress=False, seed=7, gradient_checkpointing=False)
    values.update(overrides)
    return TrainingSettings(**values)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset_folder(tmp_path_factory.mktemp("data") / "dataset", CAPTIONS)


# ------------------------------------------------------------------------------ 3. adamw8bit in the image, early


def test_adamw8bit_is_refused_before_the_slow_preprocessing(tmp_path, monkeypatch):
    import preprocess
    import train

    def no_preprocessing(*args, **kwargs):
        raise AssertionError("preprocessing ran before the optimizer was refused")

    monkeypatch.setattr(preprocess, "preprocess", no_preprocessing)
    photos = tmp_path / "photos.zip"
    with zipfile.ZipFile(photos, "w") as archive:
        archive.writestr("a.png", b"not needed")
    with pytest.raises(RunFailed, match="adamw8bit needs a CUDA GPU"):
        train.train(input_images=photos, optimizer="adamw8bit", captioning_model="")


def test_the_gpu_image_installs_bitsandbytes():
    import sys

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "scripts"))
    import gpu_requirements
    lines = (root / "requirements-gpu.txt").read_text().splitlines()
    assert any(line.startswith("bitsandbytes==") for line in lines)
    assert not any(line.startswith("bitsandbytes") for line in (root / "requirements.txt").read_text().splitlines())
    assert "bitsandbytes" in gpu_requirements.gpu_requirements("torch==2.13.0\n")


# ------------------------------------------------------------------------------------ 4. precision=auto, fp16


@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float16), ((7, 0), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_precision_picks_bf16_only_on_bf16_hardware(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # counts emulation: not asked
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    runtime = base_model.pick_runtime("auto", "cuda:1")
    assert runtime.dtype == expected and runtime.device == torch.device("cuda", 1)
    assert runtime.vae_dtype == torch.float32
    assert base_model.pick_runtime("auto", "cpu").dtype == torch.float32


def test_only_fp16_scales_the_loss():
    cuda = torch.device("cuda")
    assert trainer_module.needs_loss_scaling(base_model.Runtime(cuda, torch.float16, torch.float32))
    assert not trainer_module.needs_loss_scaling(base_model.Runtime(cuda, torch.bfloat16, torch.float32))
    assert not trainer_module.needs_loss_scaling(base_model.pick_runtime("fp32", "cpu"))


def test_loss_scaling_clips_the_unscaled_gradients_and_ignores_accelerates_mixed_precision(dataset, tmp_path,
                                                                                           monkeypatch):
    """The fp16 path's loss scaling, run in float32 on the CPU: with the loss scaled by 2^16 the clipped norms and
    the trained weights are those of the unscaled run (a missing unscale would show norms 65536x larger), and an
    `accelerate launch --mixed_precision fp16` environment does not add accelerate's own scaling."""
    norms: dict[str, list[float]] = {}
    clip = torch.nn.utils.clip_grad_norm_

    def run(name: str) -> dict[str, torch.Tensor]:
        norms[name] = []

        def recording_clip(params, max_norm, *args, **kwargs):
            norm = clip(params, max_norm, *args, **kwargs)
            norms[name].append(float(norm))
            return norm

        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
        trainer = Trainer.create(make_settings(dataset, tmp_path / name, max_grad_norm=MAX_NORM))
        assert trainer.accelerator.mixed_precision == "no"
        assert trainer.loss_scaler.is_enabled() == (name == "scaled")
        trainer.run()
        if name == "scaled":
            assert trainer.loss_scaler.get_scale() == trainer_module.INITIAL_LOSS_SCALE  # no overflow, no skip
        return {k: v.detach().clone() for k, v in trainer._trainable_state().items()}

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    plain = run("plain")
    monkeypatch.setattr(trainer_module, "needs_loss_scaling", lambda runtime: True)
    scaled = run("scaled")
    assert len(norms["scaled"]) == 3
    for a, b in zip(norms["plain"], norms["scaled"]):
        assert b == pytest.approx(a, rel=1e-4)
    assert all(n > MAX_NORM for n in norms["plain"]), norms  # the clipping does act
    for key in plain:
        torch.testing.assert_close(scaled[key], plain[key], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------- 5. half precision: fp16 files


@pytest.mark.parametrize("precision, variant", [("fp16", "fp16"), ("bf16", "fp16"), ("fp32", None)])
def test_half_precision_runtimes_download_the_fp16_files(monkeypatch, precision, variant):
    import diffusers

    captured = {}

    class Loaded(Exception):
        pass

    def fake_from_pretrained(source, **kwargs):
        captured.update(kwargs, source=source)
        raise Loaded

    monkeypatch.setattr(diffusers.StableDiffusionXLPipeline, "from_pretrained", fake_from_pretrained)
    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", lambda *a, **k: "fp16-fix vae")
    runtime = base_model.Runtime(torch.device("cuda"), {"fp16": torch.float16, "bf16": torch.bfloat16,
                                                        "fp32": torch.float32}[precision], torch.float32)
    with pytest.raises(Loaded):
        base_model.load_sdxl_pipeline("stabilityai/stable-diffusion-xl-base-1.0", runtime)
    assert captured.get("variant") == variant and captured["dtype"] == runtime.dtype
    assert (captured.get("vae") == "fp16-fix vae") == (precision == "fp16")


# ------------------------------------------------------------------------------------------ 6. SDXL_DEVICE=cuda:N


def test_generators_land_on_the_runtime_device_with_its_index(monkeypatch):
    created = []

    class RecordingGenerator:
        def __init__(self, device="cpu"):
            created.append(torch.device(device))

        def manual_seed(self, seed):
            return self

    monkeypatch.setattr(torch, "Generator", RecordingGenerator)
    base_model.Runtime(torch.device("cuda", 3), torch.bfloat16, torch.float32).generator(5)
    assert created == [torch.device("cuda", 3)]


def test_a_single_process_trainer_leaves_the_unet_on_the_runtime_device(dataset, tmp_path, monkeypatch):
    """accelerate's device for one process is plain "cuda" (GPU 0); a UNet moved there while everything else sits on
    SDXL_DEVICE=cuda:N breaks. Here accelerate's device is faked to "meta": the UNet must stay where it was."""
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "device", property(lambda self: torch.device("meta")))
    trainer = Trainer.create(make_settings(dataset, tmp_path / "out", max_train_steps=1))
    assert {p.device.type for p in trainer.unet_for_training.parameters()} == {"cpu"}
    trainer.run()
    assert math.isfinite(trainer.loss_history[0])


# ------------------------------------------------------------------------------------ 7. resume with fewer GPUs


def test_resume_restores_the_rng_of_the_gpus_this_machine_has(monkeypatch):
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=None: restored.append(device))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("restored every saved GPU"))
    cpu = torch.get_rng_state()
    states = {"torch_cpu": cpu, "torch_cuda_0": torch.zeros(16, dtype=torch.uint8),
              "torch_cuda_1": torch.zeros(16, dtype=torch.uint8)}
    checkpoints.restore_rng(states)
    assert restored == [0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    checkpoints.restore_rng(states)  # a CPU machine resumes a GPU run
    assert restored == [0] and torch.equal(torch.get_rng_state(), cpu)


# ---------------------------------------------------------------------------------- 8. the predictor after an OOM


@pytest.fixture(scope="module")
def bf16_models():
    """The tiny models in bf16 on the CPU, with the VAE flagged like SDXL's (force_upcast: img2img upcasts it)."""
    settings = generation.ModelSettings(base_model="tiny", refiner_model="tiny", safety_checker_model="tiny",
                                        feature_extractor_model="tiny", max_image_side=96)
    models = generation.load_models(settings, base_model.pick_runtime("bf16", "cpu"))
    models.txt2img.vae.register_to_config(force_upcast=True)
    return models


def request(**overrides) -> generation.GenerationRequest:
    values = dict(prompt="a photo of a dog", negative_prompt="", image=None, mask=None, width=64, height=64,
                  num_outputs=1, scheduler="K_EULER", num_inference_steps=2, guidance_scale=7.5, prompt_strength=0.8,
                  seed=3, refine="no_refiner", high_noise_frac=0.8, refine_steps=None, apply_watermark=False,
                  disable_safety_checker=True, output_format="png", output_quality=80)
    values.update(overrides)
    return generation.GenerationRequest(**values)


def test_an_oom_inside_img2img_leaves_later_txt2img_calls_intact(bf16_models, tmp_path, monkeypatch):
    models = bf16_models
    assert models.vae_dtype == torch.bfloat16
    before = np.asarray(generation.generate(models, request(), "a photo of a dog")[0])
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(photo)
    vae = models.img2img.vae

    def out_of_memory(*args, **kwargs):
        assert vae.dtype == torch.float32  # diffusers upcast it for the encode
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(vae, "encode", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        generation.generate(models, request(image=photo), "a photo of a dog")
    assert vae.dtype == torch.float32  # the state the defect leaves behind
    monkeypatch.undo()
    after = np.asarray(generation.generate(models, request(), "a photo of a dog")[0])
    assert vae.dtype == torch.bfloat16
    assert_images_close(after, before)


def test_img2img_inputs_are_capped_to_the_largest_side(bf16_models, tmp_path):
    photo = tmp_path / "large.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (150, 300, 3), dtype=np.uint8)).save(photo)
    image = generation.generate(bf16_models, request(image=photo), "a photo of a dog")[0]
    assert image.size == (96, 48)  # 300x150 scaled to max_image_side=96, multiples of 8
    assert generation.capped_input_size((4000, 3001), 2048) == (2048, 1536)
    assert generation.capped_input_size((100, 60), 2048) == (96, 56)


def test_vae_slicing_and_tiling_only_when_the_outputs_would_not_fit(bf16_models, monkeypatch):
    one = generation.vae_decode_bytes(1024, 1024, torch.float16)
    assert 0.5 * 1024**3 < one < 2 * 1024**3
    assert generation.plan_vae_decode(1024, 1024, 4, torch.float16, 10 * one) == generation.DecodePlan(False, False)
    assert generation.plan_vae_decode(1024, 1024, 4, torch.float16, 3 * one) == generation.DecodePlan(True, False)
    assert generation.plan_vae_decode(1024, 1024, 4, torch.float16, one // 2) == generation.DecodePlan(True, True)
    vae = bf16_models.txt2img.vae
    monkeypatch.setattr(generation, "free_bytes", lambda device: 1)
    generation.generate(bf16_models, request(num_outputs=2), "a photo of a dog")
    assert vae.use_slicing and vae.use_tiling
    monkeypatch.setattr(generation, "free_bytes", lambda device: 2**50)
    generation.generate(bf16_models, request(num_outputs=2), "a photo of a dog")
    assert not vae.use_slicing and not vae.use_tiling


def test_tf32_matmuls_are_switched_on_for_cuda_only():
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        base_model.allow_tf32(torch.device("cpu"))
        assert torch.get_float32_matmul_precision() == "highest"
        base_model.allow_tf32(torch.device("cuda", 1))
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(previous)


# --------------------------------------------------------------------------------------- 9. the pivot in chunks


def test_the_pivot_encodes_captions_in_chunks_with_the_same_result(dataset, tmp_path, monkeypatch):
    batch_sizes = []
    encode = trainer_module.encode_prompt

    def recording_encode(encoders, tokens):
        batch_sizes.append(tokens[0].shape[0])
        return encode(encoders, tokens)

    monkeypatch.setattr(trainer_module, "PIVOT_ENCODE_CHUNK", 3)
    monkeypatch.setattr(trainer_module, "encode_prompt", recording_encode)
    trainer = Trainer.create(make_settings(dataset, tmp_path / "out", caption_dropout=0.5))
    trainer._pass_pivot()
    assert batch_sizes == [3, 2]  # four captions and the empty one
    captions = sorted(trainer.text_cache)
    with torch.no_grad():
        embeds, pooled = encode(trainer.text_encoders, trainer.prompt_tokenizer(captions))
    for index, caption in enumerate(captions):
        torch.testing.assert_close(trainer.text_cache[caption][0], embeds[index], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(trainer.text_cache[caption][1], pooled[index], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ 10. full fine-tune memory, up front

SDXL_UNET_PARAMS = 2_567_463_684
GIB = 1024**3


def test_full_finetune_memory_counts_weights_gradients_and_optimizer_state():
    needed = memory_fit.full_finetune_bytes(SDXL_UNET_PARAMS, 2, "adamw")  # bf16 UNet → fp32 + grads + 2 moments
    assert needed == SDXL_UNET_PARAMS * (2 + 4 + 8)
    assert memory_fit.full_finetune_refusal(SDXL_UNET_PARAMS, 2, "adamw", 120 * GIB, True) is None
    refusal = memory_fit.full_finetune_refusal(SDXL_UNET_PARAMS, 2, "adamw", 40 * GIB, True)
    assert "is_lora=true" in refusal and "optimizer=adamw8bit" in refusal and "\n" not in refusal
    refusal = memory_fit.full_finetune_refusal(SDXL_UNET_PARAMS, 2, "adamw", 10 * GIB, True)
    assert "is_lora=true" in refusal and "adamw8bit" not in refusal


def test_a_full_finetune_that_cannot_fit_is_refused_before_training(dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(memory_fit, "free_bytes", lambda device: 1024**2)
    with pytest.raises(SettingsError, match="is_lora=true"):
        Trainer.create(make_settings(dataset, tmp_path / "out", is_lora=False))


def test_the_checkpointing_estimate_reserves_room_for_gradients_and_optimizer_state(monkeypatch):
    pipe = base_model.load_sdxl_pipeline("tiny", base_model.pick_runtime("fp32", "cpu"))
    width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    kwargs = dict(batch_size=2, latent_size=(8, 8), text_shape=(77, width),
                  pooled_dim=pipe.text_encoder_2.config.projection_dim, device=torch.device("cpu"),
                  autocast=torch.autocast("cpu", enabled=False))
    unet = pipe.unet
    monkeypatch.setattr(memory_fit, "free_bytes", lambda device: 512 * 1024**2)
    assert not memory_fit.needs_gradient_checkpointing(unet, **kwargs)
    assert memory_fit.needs_gradient_checkpointing(unet, **kwargs, reserved_bytes=512 * 1024**2)


# ------------------------------------------------------------------------- 1. class images split across processes


@pytest.mark.parametrize("missing, processes", [(0, 2), (1, 2), (5, 2), (7, 3), (4, 1)])
def test_every_class_image_is_rendered_by_exactly_one_process(missing, processes):
    shares = [class_image_indices(missing, rank, processes) for rank in range(processes)]
    assert sorted(i for share in shares for i in share) == list(range(missing))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
