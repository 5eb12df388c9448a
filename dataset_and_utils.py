"""Training data for pivotal tuning: trigger words, new-token embeddings, the dataset and its cached tensors.

* Trigger words (``TOK`` or ``TOK:2,STY:1``) become runs of new tokens ``<s0><s1>…`` in every caption.
* :class:`TokenEmbeddingsHandler` owns the new tokens in both SDXL tokenizers/text encoders for the whole run.
* :func:`read_dataset_folder` reads the dataset folder of ``docs/CONTRACTS.md`` (or a plain folder of images),
  and :class:`CachedDataset` holds each item's VAE latents, latent-resolution mask and SDXL micro-conditioning.
* :func:`encode_prompt` is SDXL's prompt encoding: penultimate hidden states of both encoders concatenated,
  pooled embedding from the second.
"""

from __future__ import annotations

import csv
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
ENCODER_KEYS = ("clip_l", "clip_g")  # first and second SDXL text encoder


class DatasetError(ValueError):
    """A dataset or trigger-word problem, one line naming what to change."""


# ---------------------------------------------------------------------------------------------- trigger words


@dataclass(frozen=True)
class TriggerWord:
    word: str
    tokens: tuple[str, ...]  # e.g. ("<s0>", "<s1>")

    @property
    def replacement(self) -> str:
        return "".join(self.tokens)


def parse_token_string(token_string: str, num_new_tokens: int = 2) -> list[TriggerWord]:
    """``"TOK"`` → TOK gets ``num_new_tokens`` tokens; ``"TOK:2,STY:1"`` → one entry per concept, tokens numbered
    consecutively across concepts (``<s0><s1>`` for TOK, ``<s2>`` for STY)."""
    entries = [part.strip() for part in token_string.split(",") if part.strip()]
    if not entries:
        raise DatasetError("token_string is empty; give a trigger word such as TOK (or TOK:2,STY:1)")
    triggers: list[TriggerWord] = []
    next_index = 0
    for entry in entries:
        word, _, count_text = entry.partition(":")
        word = word.strip()
        if not re.fullmatch(r"\w+", word):
            raise DatasetError(f"trigger word {word!r} in token_string must be a single word of letters/digits/_")
        try:
            count = int(count_text) if count_text else num_new_tokens
        except ValueError:
            raise DatasetError(f"token count {count_text!r} for trigger {word!r} is not an integer") from None
        if count < 1:
            raise DatasetError(f"trigger {word!r} needs at least 1 new token, got {count}")
        if any(t.word == word for t in triggers):
            raise DatasetError(f"trigger word {word!r} appears twice in token_string")
        triggers.append(TriggerWord(word, tuple(f"<s{i}>" for i in range(next_index, next_index + count))))
        next_index += count
    return triggers


def special_params(triggers: list[TriggerWord]) -> dict[str, str]:
    """Trigger word → its new tokens, as written to ``special_params.json``."""
    return {t.word: t.replacement for t in triggers}


def all_new_tokens(triggers: list[TriggerWord]) -> list[str]:
    return [token for t in triggers for token in t.tokens]


def _trigger_pattern(word: str) -> re.Pattern:
    return re.compile(rf"(?<!\w){re.escape(word)}(?!\w)")


def contains_trigger(caption: str, trigger: TriggerWord) -> bool:
    return _trigger_pattern(trigger.word).search(caption) is not None


def replace_trigger_words(caption: str, triggers: list[TriggerWord]) -> str:
    """Whole-word, case-exact replacement: ``TOK`` → ``<s0><s1>``; ``TOKYO`` and ``tok`` stay as they are."""
    for trigger in triggers:
        caption = _trigger_pattern(trigger.word).sub(trigger.replacement, caption)
    return caption


# ------------------------------------------------------------------------------------------- new-token rows


class TokenEmbeddingsHandler:
    """The new tokens in both tokenizers and text encoders: add, initialise, train, export.

    Only the new rows train. Each encoder gets a float32 parameter of its new rows ([n, d], in :attr:`rows`) that
    a forward hook on its token-embedding module substitutes for the lookups of the new ids, so gradients reach
    those rows alone: no dense [vocab, d] gradient or optimizer state, and the table (in the encoder's dtype) is
    never written except for the new rows, which :meth:`retract_embeddings` copies in after every optimizer step
    (after renormalising their std, as cog-sdxl does). Every other row stays bit-identical by construction.
    """

    def __init__(self, text_encoders: list[torch.nn.Module], tokenizers: list):
        self.text_encoders = text_encoders
        self.tokenizers = tokenizers
        self.tokens: list[str] = []
        self.token_ids: list[torch.Tensor] = []  # per encoder, ids of the new rows (consecutive)
        self.rows: list[torch.nn.Parameter] = []  # per encoder, the new rows in float32: what trains
        self.table_stds: list[float] = []

    def tables(self) -> list[torch.Tensor]:
        return [enc.get_input_embeddings().weight for enc in self.text_encoders]

    def add_tokens(self, tokens: list[str], init_word: str | None = None, generator: torch.Generator | None = None):
        """Add ``tokens`` to both tokenizers/encoders. Rows start random (normal, scaled to the table's std) or,
        with ``init_word``, as the mean of that word's token embeddings."""
        self.tokens = list(tokens)
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            if any(t in tokenizer.get_vocab() for t in tokens):
                raise DatasetError(f"tokenizer already contains one of {tokens}; pick another token_string")
            tokenizer.add_tokens(tokens)
            ids = torch.tensor(tokenizer.convert_tokens_to_ids(tokens))
            encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            table = encoder.get_input_embeddings().weight.requires_grad_(False)
            if ids.tolist() != list(range(table.shape[0] - len(tokens), table.shape[0])):
                raise RuntimeError(f"new tokens got ids {ids.tolist()}, not the last rows of a {table.shape[0]}-row table")
            with torch.no_grad():
                old_rows = torch.ones(table.shape[0], dtype=torch.bool)
                old_rows[ids] = False
                std = table[old_rows].float().std().item()
                initial = self._initial_rows(tokenizer, table, ids, std, init_word, generator)
                table[ids.to(table.device)] = initial.to(table.device, table.dtype)
            self.token_ids.append(ids)
            self.table_stds.append(std)
            self.rows.append(torch.nn.Parameter(initial.float().to(table.device), requires_grad=False))
            encoder.get_input_embeddings().register_forward_hook(self._substitution_hook(len(self.rows) - 1))

    def _substitution_hook(self, index: int):
        """Forward hook of encoder ``index``'s token embedding: the new ids' outputs come from ``rows[index]``."""

        first = int(self.token_ids[index][0])

        def substitute(module, args, output):
            input_ids, rows = args[0], self.rows[index]
            is_new = (input_ids >= first).unsqueeze(-1)
            from_rows = rows[(input_ids - first).clamp(0, len(rows) - 1)].to(output.dtype)
            return torch.where(is_new, from_rows, output)  # no branch on the data: no host-device sync

        return substitute

    @staticmethod
    def _initial_rows(tokenizer, table, ids, std, init_word, generator) -> torch.Tensor:
        if init_word is None:
            noise = torch.randn(len(ids), table.shape[1], generator=generator)
            return noise * std
        word_ids = tokenizer(init_word, add_special_tokens=False).input_ids
        if not word_ids:
            raise DatasetError(f"token_init_word {init_word!r} tokenizes to nothing; pick a real word")
        return table[torch.tensor(word_ids)].float().mean(dim=0, keepdim=True).expand(len(ids), -1).clone().cpu()

    def set_trainable(self, trainable: bool) -> None:
        for rows in self.rows:
            rows.requires_grad_(trainable)
            if not trainable:
                rows.grad = None

    @torch.no_grad()
    def retract_embeddings(self) -> None:
        """Pull the new rows' std gently towards the table's std and copy them into the tables."""
        for rows, std in zip(self.rows, self.table_stds):
            off_ratio = std / rows.std().clamp_min(1e-12)
            rows.mul_(off_ratio**0.1)
        self._write_rows_to_tables()

    @torch.no_grad()
    def _write_rows_to_tables(self) -> None:
        for table, ids, rows in zip(self.tables(), self.token_ids, self.rows):
            table[ids.to(table.device)] = rows.to(table.dtype)

    def embeddings(self) -> dict[str, torch.Tensor]:
        """``{"clip_l": [n, d1], "clip_g": [n, d2]}``, rows in token order, float32 on CPU."""
        return {key: rows.detach().float().cpu().contiguous() for key, rows in zip(ENCODER_KEYS, self.rows)}

    @torch.no_grad()
    def load_embeddings(self, embeddings: dict[str, torch.Tensor]) -> None:
        for key, rows in zip(ENCODER_KEYS, self.rows):
            rows.copy_(embeddings[key].to(rows.device, rows.dtype))
        self._write_rows_to_tables()

    def save(self, path: Path) -> None:
        save_file(self.embeddings(), str(path))

    def load(self, path: Path) -> None:
        self.load_embeddings(load_file(str(path)))


# ---------------------------------------------------------------------------------------------- dataset folder


@dataclass(frozen=True)
class DatasetItem:
    image_path: Path
    mask_path: Path | None
    caption: str  # as written, with trigger words (not yet replaced)
    original_size: tuple[int, int]  # (height, width) of the decoded photo
    crop_top_left: tuple[int, int]  # (top, left)


def read_dataset_folder(folder: Path, caption_prefix: str = "") -> list[DatasetItem]:
    """Items of a dataset folder (``captions.csv`` present) or of a plain folder of images (caption_prefix)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"dataset folder {folder} does not exist")
    csv_path = folder / "captions.csv"
    items = _read_captions_csv(folder, csv_path) if csv_path.is_file() else _read_plain_folder(folder, caption_prefix)
    if not items:
        raise DatasetError(f"no images found in {folder}; give at least one .png/.jpg/.webp image")
    return items


def _read_captions_csv(folder: Path, csv_path: Path) -> list[DatasetItem]:
    items = []
    with csv_path.open(newline="", encoding="utf-8") as handle:
        for line, row in enumerate(csv.DictReader(handle), start=2):
            try:
                image_path = folder / row["image_file"]
                mask_path = folder / row["mask_file"] if row.get("mask_file") else None
                item = DatasetItem(
                    image_path=image_path,
                    mask_path=mask_path,
                    caption=row["caption"],
                    original_size=(int(row["original_height"]), int(row["original_width"])),
                    crop_top_left=(int(row["crop_top"]), int(row["crop_left"])),
                )
            except (KeyError, TypeError, ValueError) as err:
                raise DatasetError(f"{csv_path} line {line}: bad or missing column ({err})") from None
            for path in (item.image_path, item.mask_path):
                if path is not None and not path.is_file():
                    raise DatasetError(f"{csv_path} line {line}: file {path.name} does not exist")
            items.append(item)
    return items


def _read_plain_folder(folder: Path, caption_prefix: str) -> list[DatasetItem]:
    items = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            with Image.open(path) as image:
                width, height = ImageOps.exif_transpose(image).size
            items.append(DatasetItem(path, None, caption_prefix.strip(), (height, width), (0, 0)))
    return items


# ------------------------------------------------------------------------------------------- captions


@dataclass(frozen=True)
class CaptionAugmentation:
    dropout: float = 0.0  # probability of training on the empty caption
    shuffle: bool = False  # shuffle comma-separated tags after the first keep_tokens
    keep_tokens: int = 1

    def apply(self, caption: str, rng: random.Random) -> str:
        if self.dropout > 0 and rng.random() < self.dropout:
            return ""
        if self.shuffle:
            tags = [tag.strip() for tag in caption.split(",")]
            head, tail = tags[: self.keep_tokens], tags[self.keep_tokens :]
            rng.shuffle(tail)
            caption = ", ".join(tag for tag in head + tail if tag)
        return caption


class PromptTokenizer:
    """Tokenises each distinct caption once for both tokenizers and remembers the ids."""

    def __init__(self, tokenizers: list):
        self.tokenizers = tokenizers
        self._cache: dict[str, tuple[torch.Tensor, ...]] = {}

    def __call__(self, captions: list[str]) -> list[torch.Tensor]:
        per_caption = [self._ids(caption) for caption in captions]
        return [torch.stack([ids[k] for ids in per_caption]) for k in range(len(self.tokenizers))]

    def _ids(self, caption: str) -> tuple[torch.Tensor, ...]:
        if caption not in self._cache:
            self._cache[caption] = tuple(
                tok(caption, padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt").input_ids[0]
                for tok in self.tokenizers
            )
        return self._cache[caption]


def encode_prompt(text_encoders: list[torch.nn.Module],
                  input_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL prompt encoding: ``([B, 77, d1 + d2], [B, d2])``."""
    hidden = []
    pooled = None
    for encoder, ids in zip(text_encoders, input_ids):
        output = encoder(ids.to(encoder.device), output_hidden_states=True)
        hidden.append(output.hidden_states[-2])
        pooled = output[0]  # the projected pooled embedding of the last (second) encoder
    return torch.cat(hidden, dim=-1), pooled


# ------------------------------------------------------------------------------------------- cached tensors


def load_image(path: Path, size: int | None = None) -> Image.Image:
    """RGB image, EXIF-rotated; with ``size`` centre-cropped to a square and resized (plain-folder datasets)."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
    if size is not None and image.size != (size, size):
        image = ImageOps.fit(image, (size, size), Image.Resampling.LANCZOS)
    return image


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """[3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def mask_to_latent_tensor(path: Path | None, image_size: tuple[int, int], latent_size: tuple[int, int]) -> torch.Tensor:
    """[1, h, w] loss weights in [0, 1] at latent resolution (all ones without a mask)."""
    if path is None:
        return torch.ones(1, *latent_size)
    with Image.open(path) as mask:
        mask = mask.convert("L")
        if mask.size != (image_size[1], image_size[0]):
            mask = mask.resize((image_size[1], image_size[0]), Image.Resampling.BILINEAR)
        weights = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]
    return F.interpolate(weights, size=latent_size, mode="area")[0]


@dataclass
class CachedItem:
    latents: torch.Tensor  # [4, h, w], scaled by the VAE's scaling factor
    flipped_latents: torch.Tensor | None
    mask: torch.Tensor  # [1, h, w]
    caption: str  # trigger words already replaced by new tokens
    time_ids: torch.Tensor  # [6]: original (h, w), crop (top, left), target (h, w)


class CachedDataset:
    """Every item's VAE latents (and horizontally flipped latents), mask and micro-conditioning, computed once."""

    def __init__(self, items: list[CachedItem]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    @classmethod
    @torch.no_grad()
    def build(cls, dataset: list[DatasetItem], vae, triggers: list[TriggerWord], *, resize_to: int | None,
              flip: bool, device: torch.device, dtype: torch.dtype, show_progress: bool = True) -> CachedDataset:
        from tqdm.auto import tqdm

        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        cached = []
        for item in tqdm(dataset, desc="caching latents", disable=not show_progress):
            image = load_image(item.image_path, resize_to)
            pixels = image_to_tensor(image)[None].to(device, dtype)
            height, width = pixels.shape[-2:]
            if height % factor or width % factor:
                raise DatasetError(f"{item.image_path.name}: size {width}x{height} is not a multiple of {factor}")
            latents = _encode(vae, pixels)
            flipped = _encode(vae, torch.flip(pixels, dims=[-1])) if flip else None
            cached.append(CachedItem(
                latents=latents,
                flipped_latents=flipped,
                mask=mask_to_latent_tensor(item.mask_path, (height, width),
                                           (height // factor, width // factor)).to(device),
                caption=replace_trigger_words(item.caption, triggers),
                time_ids=torch.tensor([*item.original_size, *item.crop_top_left, height, width],
                                      dtype=torch.float32, device=device),
            ))
        return cls(cached)

    def batch(self, indices: list[int], flips: list[bool]) -> dict:
        """Stack items ``indices`` (flipped where ``flips`` says so) into a training batch."""
        latents, masks = [], []
        for index, flip in zip(indices, flips):
            item = self.items[index]
            use_flip = flip and item.flipped_latents is not None
            latents.append(item.flipped_latents if use_flip else item.latents)
            masks.append(torch.flip(item.mask, dims=[-1]) if use_flip else item.mask)
        return {
            "latents": torch.stack(latents),
            "masks": torch.stack(masks),
            "captions": [self.items[i].caption for i in indices],
            "time_ids": torch.stack([self.items[i].time_ids for i in indices]),
        }


def _encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    latents = vae.encode(pixels).latent_dist.mean
    return (latents * vae.config.scaling_factor)[0].float()  # stays on the training device
