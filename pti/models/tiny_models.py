"""Tiny SDXL: the real pipeline classes at toy sizes, random weights from a fixed seed, no network.

It keeps SDXL's structural facts, so every code path that runs on it runs on the real model:
two CLIP text encoders of different widths (the second with a projection for the pooled embedding),
their penultimate hidden states concatenated as the UNet's cross-attention input, UNet text-time
micro-conditioning, a VAE that downsamples x8 with SDXL's scaling factor, and SDXL's Euler scheduler.
The tokenizers are real ``CLIPTokenizer``s over a small byte-level BPE vocabulary written here.
"""

from __future__ import annotations

import itertools
import json
import shutil
import tempfile
from pathlib import Path

import torch

from pti.models.build_cache import cached_build

TINY_VERSION = "v1"
TINY_SEED = 0

# Words that get whole-word BPE merges, so common caption text tokenizes to few tokens.
_WORDS = (
    "a an the of on in at by with and or to for from is photo picture image portrait style painting "
    "drawing render man woman person people face smiling smile sitting standing window windowsill office "
    "car ground table toy monster knitted dog cat red blue green white black yellow small large close up "
    "shot background light dark street city beach forest room wearing hat shirt dress hair eyes looking "
    "camera high quality detailed blurry cartoon anime character game in front view side best"
).split()

SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_clip_bpe(folder: Path, words: tuple[str, ...] | list[str] = _WORDS, pad_token: str = "<|endoftext|>",
                   target_vocab: int | None = None) -> int:
    """Write ``vocab.json``/``merges.txt``/tokenizer config for a CLIP tokenizer; return the vocab size.

    Byte-level symbols come first (as in CLIP), then one merge chain per word, then the two special tokens.
    With ``target_vocab`` the vocabulary is filled with merges of letter pairs/triples up to that size
    (used for the full-size random model, whose embedding tables have CLIP's 49,408 rows).
    """
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab: list[str] = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    known = set(vocab)

    def add_word_chain(word: str) -> None:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            a, b = symbols[0], symbols[1]
            merged = a + b
            if merged not in known:
                merges.append((a, b))
                vocab.append(merged)
                known.add(merged)
            symbols = [merged] + symbols[2:]

    for word in words:
        add_word_chain(word)
    if target_vocab is not None:
        letters = "abcdefghijklmnopqrstuvwxyz"
        fillers = ("".join(p) for n in (2, 3, 4) for p in itertools.product(letters, repeat=n))
        for word in fillers:
            if len(vocab) >= target_vocab - 2:
                break
            add_word_chain(word)
        del vocab[target_vocab - 2:]
        merges = merges[: len(vocab) - 2 * len(chars)]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    (folder / "special_tokens_map.json").write_text(json.dumps({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}))
    return len(vocab)


def tiny_configs(vocab_size: int) -> dict:
    """Configs of the tiny pipeline's modules (text widths 32/64 stand in for SDXL's 768/1280)."""
    text_common = dict(
        vocab_size=vocab_size, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3,
        max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1, pad_token_id=1,
    )
    return {
        "text_encoder": dict(text_common, hidden_size=32, projection_dim=32),
        "text_encoder_2": dict(text_common, hidden_size=64, projection_dim=64, intermediate_size=128),
        "unet": dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2),
            cross_attention_dim=32 + 64,
            norm_num_groups=8,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=64 + 6 * 8,
        ),
        "vae": dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=128,
            scaling_factor=0.13025,
            force_upcast=False,
        ),
    }


def build_tiny_sdxl(folder: Path, seed: int = TINY_SEED) -> None:
    """Build the tiny pipeline from ``seed`` and save it in diffusers layout (safetensors) to ``folder``."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tmp = Path(tempfile.mkdtemp(prefix="tokenizers-"))
    try:
        vocab_size = write_clip_bpe(tmp / "tokenizer")
        write_clip_bpe(tmp / "tokenizer_2", pad_token="!")
        tokenizer = CLIPTokenizer.from_pretrained(tmp / "tokenizer")
        tokenizer_2 = CLIPTokenizer.from_pretrained(tmp / "tokenizer_2")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    configs = tiny_configs(vocab_size)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))
    unet = UNet2DConditionModel(**configs["unet"])
    vae = AutoencoderKL(**configs["vae"])
    scheduler = EulerDiscreteScheduler(**SCHEDULER_CONFIG)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def ensure_tiny_sdxl(seed: int = TINY_SEED) -> Path:
    """The cached tiny pipeline folder, built on first use."""
    return cached_build(f"tiny-sdxl-{TINY_VERSION}-seed{seed}", lambda folder: build_tiny_sdxl(folder, seed))


TINY_REFINER_VERSION = "v1"
TINY_SAFETY_VERSION = "v1"


def tiny_refiner_unet_config() -> dict:
    """The refiner's UNet: cross-attention on the second text encoder only (width 64), and five time ids
    (original size, crop, aesthetic score) instead of the base's six, as in SDXL's refiner."""
    config = dict(tiny_configs(vocab_size=0)["unet"])
    text_width, time_embed = 64, config["addition_time_embed_dim"]
    config.update(cross_attention_dim=text_width, projection_class_embeddings_input_dim=text_width + 5 * time_embed)
    return config


def build_tiny_refiner(folder: Path, seed: int = TINY_SEED) -> None:
    """A refiner pipeline folder (``StableDiffusionXLImg2ImgPipeline`` with ``requires_aesthetics_score``) whose
    VAE, second text encoder and tokenizer are the tiny base's, like SDXL's refiner shares the base's."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline, \
        UNet2DConditionModel

    base = StableDiffusionXLPipeline.from_pretrained(ensure_tiny_sdxl(seed))
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**tiny_refiner_unet_config())
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=base.vae, text_encoder=None, text_encoder_2=base.text_encoder_2, tokenizer=None,
        tokenizer_2=base.tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
    )
    refiner.save_pretrained(folder, safe_serialization=True)


def ensure_tiny_refiner(seed: int = TINY_SEED) -> Path:
    """The cached tiny refiner folder, built atomically on first use."""
    return cached_build(f"tiny-sdxl-refiner-{TINY_REFINER_VERSION}-seed{seed}",
                        lambda folder: build_tiny_refiner(folder, seed))


def build_tiny_safety_checker(folder: Path, seed: int = TINY_SEED) -> None:
    """``safety_checker/`` (a ``StableDiffusionSafetyChecker`` over a tiny CLIP vision tower) and
    ``feature_extractor/`` (a ``CLIPImageProcessor`` at the tower's 32-pixel input size) under ``folder``."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    vision = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, image_size=32,
                  patch_size=8, projection_dim=32)
    text = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=99,
                projection_dim=32, bos_token_id=97, eos_token_id=98, pad_token_id=1)
    torch.manual_seed(seed + 2)
    checker = StableDiffusionSafetyChecker(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32))
    checker.save_pretrained(folder / "safety_checker", safe_serialization=True)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(folder / "feature_extractor")


def ensure_tiny_safety_checker(seed: int = TINY_SEED) -> Path:
    """The cached tiny safety-checker folder (``safety_checker/`` and ``feature_extractor/``)."""
    return cached_build(f"tiny-safety-checker-{TINY_SAFETY_VERSION}-seed{seed}",
                        lambda folder: build_tiny_safety_checker(folder, seed))
