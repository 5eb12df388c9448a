"""Training data for pivotal tuning, under the name cog-sdxl users know: the public API of the dataset room.

* Trigger words (``TOK`` or ``TOK:2,STY:1``) become runs of new tokens ``<s0><s1>…`` in every caption.
* :class:`TokenEmbeddingsHandler` owns the new tokens in both SDXL tokenizers/text encoders for the whole run.
* :func:`read_dataset_folder` reads the dataset folder of ``docs/CONTRACTS.md`` (or a plain folder of images),
  and :class:`CachedDataset` holds each item's VAE latents, latent-resolution mask and SDXL micro-conditioning.
* :func:`encode_prompt` is SDXL's prompt encoding.

The code lives in ``pti/dataset/``; the package never imports this module.
"""

from pti.dataset.cached import CachedDataset, CachedItem, image_to_tensor, load_image, mask_to_latent_tensor
from pti.dataset.errors import DatasetError
from pti.dataset.folder import IMAGE_SUFFIXES, DatasetItem, read_dataset_folder
from pti.dataset.text import CaptionAugmentation, PromptTokenizer, encode_prompt
from pti.dataset.token_embeddings import ENCODER_KEYS, TokenEmbeddingsHandler
from pti.dataset.triggers import (
    TriggerWord,
    all_new_tokens,
    contains_trigger,
    parse_token_string,
    replace_trigger_words,
    special_params,
)

__all__ = [
    "CachedDataset", "CachedItem", "CaptionAugmentation", "DatasetError", "DatasetItem", "ENCODER_KEYS",
    "IMAGE_SUFFIXES", "PromptTokenizer", "TokenEmbeddingsHandler", "TriggerWord", "all_new_tokens",
    "contains_trigger", "encode_prompt", "image_to_tensor", "load_image", "mask_to_latent_tensor",
    "parse_token_string", "read_dataset_folder", "replace_trigger_words", "special_params",
]
