"""Tiny randomly initialised BLIP captioner, CLIPSeg segmenter and Swin2SR upscaler, built offline from a seed.

They are the real transformers classes with real processors and tokenizers, saved in `save_pretrained` layout, so the
production loading code (`from_pretrained(model_id_or_dir)`) and generation run on them in tests and benchmarks.
Their outputs are random: they show the code works, not what a caption or mask will look like.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
    CLIPSegConfig,
    CLIPSegForImageSegmentation,
    CLIPSegProcessor,
    CLIPTokenizer,
    Swin2SRConfig,
    Swin2SRForImageSuperResolution,
    Swin2SRImageProcessor,
    ViTImageProcessor,
)

from pti.models.build_cache import cached_build
from pti.models.tiny_models import write_clip_bpe

TINY_VISION_SEED = 1234
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")
CAPTION_WORDS = ("a", "photo", "of", "tok", "man", "woman", "toy", "on", "the", "in", "with", "sitting", "smiling",
                 "window", "car", "table", "red", "blue", "green", "knitted", "face", "person", "and", "at", ",", ".")
SEGMENT_WORDS = ("a", "photo", "of", "face", "person", "toy", "hair", "body", "background", "dog", "cat")


def write_bert_vocab(folder: Path, words: tuple[str, ...] = CAPTION_WORDS) -> int:
    """Write a lower-casing BERT word-piece vocabulary (BLIP's tokenizer); return its size."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = list(BERT_SPECIAL_TOKENS) + list(words)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return len(vocab)


def build_tiny_blip(folder: Path, seed: int = TINY_VISION_SEED) -> None:
    with tempfile.TemporaryDirectory() as vocab_dir:
        vocab_size = write_bert_vocab(Path(vocab_dir))
        tokenizer = BertTokenizer(str(Path(vocab_dir) / "vocab.txt"), do_lower_case=True, bos_token="[DEC]")
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    ids = {token: i for i, token in enumerate(BERT_SPECIAL_TOKENS)}
    config = BlipConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8, "projection_dim": 32},
        text_config={"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "encoder_hidden_size": 32, "max_position_embeddings": 64,
                     "bos_token_id": ids["[DEC]"], "eos_token_id": ids["[SEP]"], "sep_token_id": ids["[SEP]"],
                     "pad_token_id": ids["[PAD]"], "projection_dim": 32},
        projection_dim=32,
        image_text_hidden_size=32,
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def build_tiny_clipseg(folder: Path, seed: int = TINY_VISION_SEED) -> None:
    with tempfile.TemporaryDirectory() as vocab_dir:
        vocab_size = write_clip_bpe(Path(vocab_dir), SEGMENT_WORDS)
        tokenizer = CLIPTokenizer(str(Path(vocab_dir) / "vocab.json"), str(Path(vocab_dir) / "merges.txt"),
                                  pad_token="<|endoftext|>")
    processor = CLIPSegProcessor(
        image_processor=ViTImageProcessor(size={"height": 64, "width": 64}, image_mean=[0.485, 0.456, 0.406],
                                          image_std=[0.229, 0.224, 0.225]),
        tokenizer=tokenizer,
    )
    config = CLIPSegConfig(
        text_config={"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77,
                     "bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1, "pad_token_id": vocab_size - 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 64, "patch_size": 16},
        projection_dim=32,
        extract_layers=(0, 1),
        reduce_dim=16,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )
    torch.manual_seed(seed)
    model = CLIPSegForImageSegmentation(config).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def build_tiny_swin2sr(folder: Path, seed: int = TINY_VISION_SEED) -> None:
    """A x2 Swin2SR super-resolution model."""
    config = Swin2SRConfig(image_size=16, embed_dim=16, depths=(1,), num_heads=(2,), window_size=4, mlp_ratio=2.0,
                           upscale=2)
    torch.manual_seed(seed)
    Swin2SRForImageSuperResolution(config).eval().save_pretrained(folder)
    Swin2SRImageProcessor(pad_size=config.window_size).save_pretrained(folder)


def ensure_tiny_blip(seed: int = TINY_VISION_SEED) -> Path:
    """Folder of the tiny BLIP captioner, built on first use and cached like the tiny SDXL."""
    return cached_build(f"tiny-blip-{seed}", lambda folder: build_tiny_blip(folder, seed))


def ensure_tiny_clipseg(seed: int = TINY_VISION_SEED) -> Path:
    """Folder of the tiny CLIPSeg segmenter, built on first use and cached like the tiny SDXL."""
    return cached_build(f"tiny-clipseg-{seed}", lambda folder: build_tiny_clipseg(folder, seed))


def ensure_tiny_swin2sr(seed: int = TINY_VISION_SEED) -> Path:
    """Folder of the tiny Swin2SR upscaler, built on first use and cached like the tiny SDXL."""
    return cached_build(f"tiny-swin2sr-{seed}", lambda folder: build_tiny_swin2sr(folder, seed))
