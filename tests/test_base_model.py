import numpy as np
import pytest
import torch

from pti.models.base_model import load_sdxl_pipeline, pick_runtime, resolve_model_dir
from pti.models.tiny_models import build_tiny_sdxl


def test_tiny_model_keeps_sdxl_structure():
    pipe = load_sdxl_pipeline("tiny", pick_runtime("fp32", "cpu"))
    assert pipe.vae_scale_factor == 8
    d1, d2 = pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size
    assert d1 != d2
    assert pipe.unet.config.cross_attention_dim == d1 + d2
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.config.projection_class_embeddings_input_dim == (
        pipe.text_encoder_2.config.projection_dim + 6 * pipe.unet.config.addition_time_embed_dim
    )
    image = pipe("a photo of a dog", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_tiny_build_is_deterministic(tmp_path):
    build_tiny_sdxl(tmp_path / "a")
    from safetensors.torch import load_file

    ref = load_file(resolve_model_dir("tiny") / "unet" / "diffusion_pytorch_model.safetensors")
    again = load_file(tmp_path / "a" / "unet" / "diffusion_pytorch_model.safetensors")
    assert ref.keys() == again.keys()
    assert all(torch.equal(ref[k], again[k]) for k in ref)


def test_bad_model_setting_is_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="diffusers layout"):
        resolve_model_dir(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="precision"):
        pick_runtime("fp8")
