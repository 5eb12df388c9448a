"""``SDXL_MODEL=random-full``: the exact SDXL base architecture with random weights, built once and cached.

UNet of 2.57 B parameters (320/640/1280 channels, 1/2/10 transformer layers, cross-attention 2048), CLIP ViT-L
text encoder (768) and OpenCLIP bigG text encoder with projection (1280), both with 49,408-token vocabularies,
and the x8 VAE. It exists so that anyone can benchmark or smoke-test the whole code path at real shapes with no
hub access. The weights are random, so images are noise; shapes, memory and speed are real.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from pti.models.build_cache import cached_build

from pti.models.tiny_models import SCHEDULER_CONFIG, write_clip_bpe

FULL_VERSION = "v1"
CLIP_VOCAB = 49408

SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    norm_num_groups=32,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)

SDXL_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)

CLIP_L = dict(
    vocab_size=CLIP_VOCAB, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
    projection_dim=768, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407,
)

CLIP_BIGG = dict(
    vocab_size=CLIP_VOCAB, hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
    projection_dim=1280, max_position_embeddings=77, hidden_act="gelu", bos_token_id=49406, eos_token_id=49407,
)


def build_random_full_sdxl(folder: Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                           device: torch.device | str = "cpu") -> None:
    """Build the full-size random pipeline and save it to ``folder`` (bf16 on disk halves its 14 GB). ``device``:
    where the weights are initialised (a GPU does it in seconds; the CPU takes minutes)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tmp = Path(tempfile.mkdtemp(prefix="tokenizers-"))
    try:
        write_clip_bpe(tmp / "tokenizer", target_vocab=CLIP_VOCAB)
        write_clip_bpe(tmp / "tokenizer_2", pad_token="!", target_vocab=CLIP_VOCAB)
        tokenizer = CLIPTokenizer.from_pretrained(tmp / "tokenizer")
        tokenizer_2 = CLIPTokenizer.from_pretrained(tmp / "tokenizer_2")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if len(tokenizer) != CLIP_VOCAB:
        raise RuntimeError(f"random-full tokenizer has {len(tokenizer)} entries, expected {CLIP_VOCAB}")
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build directly in bf16: half the peak memory of building in float32
    try:
        with torch.device(device):
            pipe = StableDiffusionXLPipeline(
                vae=AutoencoderKL(**SDXL_VAE),
                text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L)),
                text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG)),
                tokenizer=tokenizer,
                tokenizer_2=tokenizer_2,
                unet=UNet2DConditionModel(**SDXL_UNET),
                scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG),
                force_zeros_for_empty_prompt=True,
            )
    finally:
        torch.set_default_dtype(previous)
    pipe.save_pretrained(folder, safe_serialization=True)


def ensure_random_full_sdxl(seed: int = 0) -> Path:
    """The cached full-size random pipeline folder, built on first use (minutes, ~8 GB on disk)."""
    return cached_build(f"random-full-sdxl-{FULL_VERSION}-seed{seed}", lambda folder: build_random_full_sdxl(folder, seed))
