"""Trained weights, hot: read trained-weights folders and switch them on a live SDXL pipeline.

* :func:`read_trained_weights` reads a folder in this project's artifact layout or replicate/cog-sdxl's
  (``lora.safetensors`` with attention-processor keys, ``embeddings.pti``), or a bare kohya/diffusers LoRA file
  (embeddings and trigger words from its ``bundle_emb`` keys, if any), into one :class:`TrainedWeights`;
  :func:`read_embedding_weights` reads a bare SDXL embedding file (``clip_l``/``clip_g``, one trigger word).
* :class:`LiveWeights` keeps a bounded set of PEFT adapters loaded in the UNet (and, for weights with a
  text-encoder LoRA, in the text encoders under the same name) and swaps the new-token embeddings with them. The adapters a request names are active together, each at its own scale (PEFT adapter
  weights), each set's new tokens under its own names; without weights the pipeline is the clean base
  (adapters disabled, tokenizers without the new tokens), so it produces exactly what a fresh process does. A
  load that fails or is cancelled half-way is rolled back to the base.
* :class:`WeightsManager` ties them to the on-disk cache (:mod:`weights_cache`) for the predictor.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
import threading
import time
import urllib.parse
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor

from pti.formats import lora_formats, sgm_checkpoint, steps, text_encoder_lora
from pti.formats.lora_formats import SDXL_UNET_LAYOUT, LoraFormatError, PeftLora, UNetLayout
from pti.models import single_file
from pti.models.base_model import model_spec
from pti.inference.text_encoder_adapters import TextEncoderAdapters
from pti.inference.weights_cache import (
    BARE_LORA,
    COG_SDXL_EMBEDDINGS,
    COG_SDXL_LORA,
    FULL_CHECKPOINT,
    FULL_UNET,
    OUR_EMBEDDINGS,
    OUR_LORA,
    SPECIAL_PARAMS,
    UNET_WEIGHT_FILES,
    WeightsCache,
    WeightsError,
    WeightsSettings,
    cache_key,
    redact,
    source_kind,
)

logger = logging.getLogger(__name__)

TRAINING_CONFIG = "training_config.json"

# ---------------------------------------------------------------------------------------------- reading


@dataclass
class TrainedWeights:
    """One trained model in memory: a UNet LoRA (PEFT layout) or full UNet weights, LoRAs of the text encoders (by
    component name, canonical module names: :mod:`text_encoder_lora`), the new-token embeddings
    (``clip_l``/``clip_g``, rows in ``<s0>…<sN>`` order) and the trigger words."""

    lora: PeftLora | None
    unet_full: dict[str, Tensor] | None
    embeddings: dict[str, Tensor]
    special_params: dict[str, str]
    text_encoder_loras: dict[str, PeftLora] = field(default_factory=dict)

    @property
    def tokens(self) -> list[str]:
        rows = next(iter(self.embeddings.values())).shape[0] if self.embeddings else 0
        return [f"<s{i}>" for i in range(rows)]


def _read_safetensors(path: Path, label: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as error:
        raise WeightsError(f"{label}: {path.name} is not a readable safetensors file ({error})") from None


def read_special_params(folder: Path, label: str) -> dict[str, str]:
    path = folder / SPECIAL_PARAMS
    if not path.is_file():
        return {}
    try:
        params = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WeightsError(f"{label}: {SPECIAL_PARAMS} is not valid JSON ({error})") from None
    if not isinstance(params, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in params.items()):
        raise WeightsError(f"{label}: {SPECIAL_PARAMS} must map trigger words to token strings")
    return params


def read_trained_weights(folder: Path, label: str | None = None,
                         layout: UNetLayout = SDXL_UNET_LAYOUT) -> TrainedWeights:
    """Read a trained-weights folder in this project's layout or replicate/cog-sdxl's, or a cache entry holding a
    bare LoRA file; ``layout`` (the live UNet's) names the modules of kohya keys."""
    label = label or str(folder)
    if (folder / BARE_LORA).is_file():
        return _read_bare_lora(folder / BARE_LORA, label, layout)
    try:
        lora, unet_full, text_encoder_loras = _read_unet_weights(folder, label)
        embeddings = _read_embeddings(folder, label)
    except LoraFormatError as error:
        raise WeightsError(f"{label}: {error}") from None
    widths = {name: t.shape[0] for name, t in embeddings.items()}
    if len(set(widths.values())) > 1:
        raise WeightsError(f"{label}: embeddings have different token counts {widths}")
    return TrainedWeights(lora, unet_full, embeddings, read_special_params(folder, label), text_encoder_loras)


def _read_bare_lora(path: Path, label: str, layout: UNetLayout) -> TrainedWeights:
    tensors, metadata = _read_safetensors(path, label)
    try:
        read = lora_formats.read_lora_file(tensors, metadata, layout)
    except LoraFormatError as error:
        raise WeightsError(f"{label}: {error}") from None
    if read.skipped_text_encoder_keys:
        logger.warning("%s: %d text-encoder LoRA keys skipped (not SDXL's lora_te1_/lora_te2_ or text_encoder(_2) "
                       "layout)", label, read.skipped_text_encoder_keys)
    return TrainedWeights(read.lora, None, read.embeddings, read.special_params, read.text_encoder_loras)


def read_embedding_weights(folder: Path, label: str, trigger: str) -> TrainedWeights:
    """A cache entry holding a bare SDXL embedding file (A1111/ComfyUI/civitai, or a trained tar's
    ``embeddings/<trigger>.safetensors``) as weights without a LoRA: all its rows are ``trigger``'s tokens."""
    path = folder / BARE_LORA
    if not path.is_file():
        raise WeightsError(f"{label}: not a .safetensors file")
    tensors, _ = _read_safetensors(path, label)
    try:
        embeddings = lora_formats.read_embedding_file(tensors)
    except LoraFormatError as error:
        raise WeightsError(f"{label}: {error}") from None
    rows = embeddings["clip_l"].shape[0]
    return TrainedWeights(None, None, embeddings, {trigger: "".join(f"<s{i}>" for i in range(rows))})


def _read_unet_weights(folder: Path, label: str) -> tuple[PeftLora | None, dict[str, Tensor] | None,
                                                         dict[str, PeftLora]]:
    """(UNet LoRA, full UNet weights, text-encoder LoRAs) of a trained-weights folder."""
    if (folder / OUR_LORA).is_file():
        tensors, metadata = _read_safetensors(folder / OUR_LORA, label)
        return (lora_formats.diffusers_file_to_peft(tensors, metadata), None,
                text_encoder_lora.from_diffusers(tensors, metadata))
    if (folder / COG_SDXL_LORA).is_file():
        tensors, _ = _read_safetensors(folder / COG_SDXL_LORA, label)
        return lora_formats.cog_sdxl_lora_to_peft(tensors), None, {}
    if (folder / FULL_CHECKPOINT).is_file():
        return None, _read_checkpoint_unet(folder / FULL_CHECKPOINT, label), {}
    if (folder / FULL_UNET).is_file():
        return None, _read_safetensors(folder / FULL_UNET, label)[0], {}
    raise WeightsError(f"{label}: folder holds none of {', '.join(UNET_WEIGHT_FILES)}")


def _read_checkpoint_unet(path: Path, label: str) -> dict[str, Tensor]:
    """The UNet of a single-file SGM checkpoint in diffusers names; only its tensors are read (the VAE and text
    encoders in the file are the base model's)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys() if k.startswith(sgm_checkpoint.UNET_PREFIX)}
        return sgm_checkpoint.sgm_unet_state(tensors)
    except (SafetensorError, OSError) as error:
        raise WeightsError(f"{label}: {path.name} is not a readable safetensors file ({error})") from None
    except sgm_checkpoint.SgmFormatError as error:
        raise WeightsError(f"{label}: {path.name}: {error}") from None


def _read_embeddings(folder: Path, label: str) -> dict[str, Tensor]:
    if (folder / OUR_EMBEDDINGS).is_file():
        tensors, _ = _read_safetensors(folder / OUR_EMBEDDINGS, label)
        missing = {"clip_l", "clip_g"} - set(tensors)
        if missing:
            raise WeightsError(f"{label}: {OUR_EMBEDDINGS} lacks {', '.join(sorted(missing))}")
        return {"clip_l": tensors["clip_l"], "clip_g": tensors["clip_g"]}
    if (folder / COG_SDXL_EMBEDDINGS).is_file():
        tensors, _ = _read_safetensors(folder / COG_SDXL_EMBEDDINGS, label)
        return lora_formats.cog_sdxl_embeddings(tensors)
    return {}


def served_base_name(spec: str | None = None) -> str:
    """The name of the base model this process serves (env ``SDXL_MODEL``), as training records it: a single file's
    file name, else the setting itself."""
    spec = model_spec(spec)
    if not single_file.is_single_file(spec):
        return spec
    return Path(urllib.parse.urlsplit(spec).path if single_file.is_url(spec) else spec).name


def log_base_mismatch(folder: Path, label: str, served: str) -> None:
    """Say in the log when trained weights were trained on another base model than the one served. The served base
    stays: loading a multi-gigabyte base per request would stall every other request (see README)."""
    trained = _training_config(folder).get("base_model_source")
    if not isinstance(trained, dict) or not trained.get("name") or trained["name"] == served:
        return
    sha = f", sha256 {trained['sha256'][:12]}…" if trained.get("sha256") else ""
    where = f" from {trained['url']}" if trained.get("url") else ""
    logger.warning("weights %s were trained on base model %s%s%s, but this predictor serves %s: images may differ "
                   "from the training samples", label, trained["name"], where, sha, served)


def _training_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / TRAINING_CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return config if isinstance(config, dict) else {}


class StepNotSaved(WeightsError):
    """``#step=<n>`` names a step the tar does not hold."""


def step_weights_folder(folder: Path, step: int, label: str) -> Path:
    """The folder of step ``step`` in an extracted tar: ``steps/<step>/``, or the top level for the run's last step
    (the final weights are not repeated under ``steps/``)."""
    if (steps.step_folder(folder, step) / SPECIAL_PARAMS).is_file():
        return steps.step_folder(folder, step)
    final = _final_step(folder)
    if step == final:
        return folder
    available = [*steps.saved_steps(folder), *([final] if final else [])]
    listed = ", ".join(str(s) for s in available) if available else "none (trained without checkpointing_steps)"
    raise StepNotSaved(f"{label}: step {step} was not saved; saved steps: {listed}")


def _final_step(folder: Path) -> int | None:
    total = _training_config(folder).get("total_steps")
    return total if isinstance(total, int) else None


# ---------------------------------------------------------------------------------------------- live pipeline


def expand_triggers(prompt: str, special_params: dict[str, str]) -> tuple[str, bool]:
    """Replace each trigger word (whole words only) by its tokens; also say whether any trigger was found."""
    found = False
    for trigger, tokens in special_params.items():
        pattern = re.compile(rf"(?<!\w){re.escape(trigger)}(?!\w)")
        prompt, count = pattern.subn(tokens.replace("\\", r"\\"), prompt)
        found = found or count > 0
    return prompt, found


def token_names(prefix: str, count: int) -> list[str]:
    """The new tokens of one active set of weights: ``<s0>…`` for ``replicate_weights``, ``<x0s0>…`` for
    ``extra_lora[0]``, and so on, so two trained models never share a token."""
    return [f"<{prefix}s{i}>" for i in range(count)]


def renamed_special_params(special_params: dict[str, str], prefix: str) -> dict[str, str]:
    """``{"TOK": "<s0><s1>"}`` with its tokens in the ``prefix`` namespace (``{"TOK": "<x0s0><x0s1>"}``)."""
    return {trigger: re.sub(r"<s(\d+)>", lambda m: f"<{prefix}s{m.group(1)}>", tokens)
            for trigger, tokens in special_params.items()}


class TokenTables:
    """The new tokens of the active weights: tokenizers that know them, embedding rows behind them.

    The base tokenizers are never changed; an extended copy per set of token names is swapped onto the pipelines
    while trained weights are active. The text encoders' embedding tables grow as needed (rows appended, existing
    rows untouched), and the active weights' vectors are written into the appended rows, one set after the other.
    The base tokenizers never produce those ids, so the base model's outputs do not depend on them.
    """

    ENCODER_NAMES = (("tokenizer", "text_encoder", "clip_l"), ("tokenizer_2", "text_encoder_2", "clip_g"))
    KEPT_TOKENIZERS = 8  # extended tokenizer copies kept for reuse (one per combination of token names)

    def __init__(self, pipelines: Sequence):
        self.pipelines = list(pipelines)
        base = self.pipelines[0]
        self.base_tokenizers = {tok: getattr(base, tok) for tok, _, _ in self.ENCODER_NAMES}
        self.encoders = {key: getattr(base, enc) for _, enc, key in self.ENCODER_NAMES}
        self.base_vocab = {tok: len(t) for tok, t in self.base_tokenizers.items()}
        self._extended: OrderedDict[tuple[str, ...], dict[str, object]] = OrderedDict()

    def check(self, embeddings: dict[str, Tensor], label: str) -> None:
        """Refuse embeddings whose width is not this base model's."""
        for key, table in embeddings.items():
            width = self.encoders[key].get_input_embeddings().weight.shape[1]
            if table.dim() != 2 or table.shape[1] != width:
                raise WeightsError(f"{label}: {key} embeddings have shape {list(table.shape)} but this base model's "
                                   f"text encoder has width {width} (weights trained for another base model?)")

    def activate(self, sets: Sequence[tuple[Sequence[str], dict[str, Tensor]]]) -> None:
        """Make each (token names, embeddings) set known, rows in the order given."""
        names = tuple(name for tokens, _ in sets for name in tokens)
        if not names:
            self.deactivate()
            return
        for tok, _, key in self.ENCODER_NAMES:
            weight = self._grown(key, self.base_vocab[tok] + len(names)).weight
            row = self.base_vocab[tok]
            with torch.no_grad():
                for tokens, embeddings in sets:
                    weight[row:row + len(tokens)] = embeddings[key].to(device=weight.device, dtype=weight.dtype)
                    row += len(tokens)
        self._set_tokenizers(self._extended_tokenizers(names))

    def deactivate(self) -> None:
        self._set_tokenizers(self.base_tokenizers)

    def _grown(self, key: str, rows: int) -> torch.nn.Embedding:
        encoder = self.encoders[key]
        table = encoder.get_input_embeddings()
        if table.weight.shape[0] >= rows:
            return table
        old = table.weight.data
        grown = torch.nn.Embedding(rows, old.shape[1], device=old.device, dtype=old.dtype)
        with torch.no_grad():
            grown.weight.zero_()
            grown.weight[: old.shape[0]] = old
        encoder.set_input_embeddings(grown)
        encoder.config.vocab_size = rows
        return grown

    def _extended_tokenizers(self, names: tuple[str, ...]) -> dict[str, object]:
        if names not in self._extended:
            extended = {}
            for name, base in self.base_tokenizers.items():
                tokenizer = copy.deepcopy(base)
                tokenizer.add_tokens(list(names), special_tokens=True)
                ids = tokenizer.convert_tokens_to_ids(list(names))
                if ids != list(range(self.base_vocab[name], self.base_vocab[name] + len(names))):
                    raise RuntimeError(f"{name}: new tokens got ids {ids}, expected them after the base vocabulary")
                extended[name] = tokenizer
            self._extended[names] = extended
            while len(self._extended) > self.KEPT_TOKENIZERS:
                self._extended.popitem(last=False)
        self._extended.move_to_end(names)
        return self._extended[names]

    def _set_tokenizers(self, tokenizers: dict[str, object]) -> None:
        for pipe in self.pipelines:
            for name, tokenizer in tokenizers.items():
                if getattr(pipe, name, None) is not None:
                    setattr(pipe, name, tokenizer)

    def active_tokenizers(self) -> list:
        base = self.pipelines[0]
        return [getattr(base, tok) for tok, _, _ in self.ENCODER_NAMES]


@dataclass
class _Loaded:
    """A trained model whose adapter sits in the UNet and/or the text encoders (or, for full UNet weights, whose
    tensors are in memory; for an embedding file alone, only its embeddings)."""

    adapter: str | None
    weights: TrainedWeights = field(repr=False)
    in_unet: bool = True  # the adapter is in the UNet (a text-encoder-only LoRA file's is not)
    in_text_encoders: bool = False  # the adapter is in one or both text encoders too


class FullUnetPatch:
    """Full fine-tuned UNet weights (``unet.safetensors``) applied in place; the base values of every tensor ever
    replaced are kept (on CPU) to restore the base exactly."""

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        self._base: dict[str, Tensor] = {}
        self._applied: set[str] = set()

    def _params(self) -> dict[str, Tensor]:
        """The UNet's tensors by their plain names (a layer wrapped for LoRA keeps its own under ``base_layer``)."""
        return {key.replace(".base_layer.", "."): value for key, value in self.unet.state_dict().items()
                if "lora_" not in key}

    def check(self, state: dict[str, Tensor], label: str) -> None:
        params = self._params()
        for key, value in state.items():
            if key not in params:
                raise WeightsError(f"{label}: the full fine-tune has {key!r}, which this base model's UNet lacks")
            if tuple(value.shape) != tuple(params[key].shape):
                raise WeightsError(f"{label}: the full fine-tune's {key} has shape {list(value.shape)} but this base "
                                   f"model's is {list(params[key].shape)} (weights trained for another base model?)")

    def apply(self, state: dict[str, Tensor]) -> None:
        params = self._params()
        with torch.no_grad():
            for key, value in state.items():
                if key not in self._base:
                    self._base[key] = params[key].detach().to("cpu", copy=True)
                self._applied.add(key)
                params[key].copy_(value.to(device=params[key].device, dtype=params[key].dtype))

    def restore(self) -> None:
        if not self._applied:
            return
        params = self._params()
        with torch.no_grad():
            for key in sorted(self._applied):
                params[key].copy_(self._base[key].to(device=params[key].device, dtype=params[key].dtype))
        self._applied.clear()


@dataclass(frozen=True)
class Activation:
    """One set of weights to make active: its cache key, how to read it on a miss, its LoRA scale, its label for
    messages, and the namespace of its new tokens (see :func:`token_names`)."""

    key: str
    read: Callable[[], TrainedWeights]
    scale: float
    label: str
    token_prefix: str = ""


class LiveWeights:
    """Switches trained weights on the pipelines (the first one owns the UNet; all share the text encoders).

    ``activate([Activation, ...])`` makes those weights active together: their LoRAs combined through PEFT's
    adapter weighting (each at its own scale), at most one set of full UNet weights under them, and every set's
    new tokens under its own names. Weights whose adapter is already loaded are not read again. ``deactivate()``
    returns to the clean base. At most ``max_loaded`` adapters stay loaded (more only while one request needs
    them), least recently used evicted. Any exception (or cancellation) during a switch leaves the pipelines on the
    base model, with no half-loaded adapter.
    """

    def __init__(self, pipelines: Sequence, max_loaded: int):
        self.pipelines = list(pipelines)
        self.unet = self.pipelines[0].unet
        self.text_encoders = TextEncoderAdapters({name: getattr(self.pipelines[0], name)
                                                  for name in text_encoder_lora.TEXT_ENCODERS})
        self.tokens = TokenTables(self.pipelines)
        self.full_unet = FullUnetPatch(self.unet)
        self.max_loaded = max(1, max_loaded)
        self.loaded: OrderedDict[str, _Loaded] = OrderedDict()
        self.active: tuple[str, ...] | None = None
        self.current: str | None = None  # the key being switched to when a switch fails
        self._consistent = True
        self._lora_enabled = False  # whether the UNet's LoRA layers are switched on (tracked: toggling walks it)

    def activate(self, items: Sequence[Activation]) -> list[TrainedWeights]:
        self._switch(lambda: self._activate(items))
        return [self.loaded[item.key].weights for item in items]

    def deactivate(self) -> None:
        self._switch(self._disable_lora)

    def _switch(self, then: Callable[[], None]) -> None:
        if not self._consistent:
            self._reset()
        self._consistent = False
        try:
            self.full_unet.restore()
            self.tokens.deactivate()
            self.active = None
            then()
        except BaseException:
            self._reset()
            raise
        self._consistent = True

    def _reset(self) -> None:
        """Back to the base after an interrupted switch: drop adapters that were never fully registered and
        disable the rest."""
        registered = {entry.adapter for entry in self.loaded.values()}
        stray = [name for name in self._adapter_names() if name not in registered]
        if stray:
            self.unet.delete_adapters(stray)
        if self._adapter_names():
            self.unet.disable_lora()
        self._lora_enabled = False
        self.text_encoders.delete(sorted(self.text_encoders.adapter_names() - registered))
        self.text_encoders.disable()
        self.full_unet.restore()
        self.tokens.deactivate()
        self.active = None
        self._consistent = True

    def _adapter_names(self) -> list[str]:
        return list(getattr(self.unet, "peft_config", {}) or {})

    def _disable_lora(self) -> None:
        if self._lora_enabled:
            self.unet.disable_lora()
            self._lora_enabled = False
        self.text_encoders.disable()

    def _enable_lora(self, adapters: list[str], scales: list[float]) -> None:
        # Each of these walks every UNet module, so only what changes is done.
        self.unet.set_adapters(adapters, weights=scales)
        if not self._lora_enabled:
            self.unet.enable_lora()
            self._lora_enabled = True

    def _activate(self, items: Sequence[Activation]) -> None:
        needed = {item.key for item in items}
        entries = []
        for item in items:
            self.current = item.key
            entry = self.loaded.get(item.key)
            if entry is None:
                entry = self._load(item.key, item.read(), item.label, needed)
            self.loaded.move_to_end(item.key)
            entries.append(entry)
        full = [(item, entry) for item, entry in zip(items, entries) if entry.weights.unet_full is not None]
        if len(full) > 1:
            raise WeightsError(f"{full[1][0].label}: full UNet weights, and {full[0][0].label} are full UNet weights "
                               f"too; one set of full weights at a time (add LoRAs beside it)")
        lora = [(entry.adapter, item.scale) for item, entry in zip(items, entries)
                if entry.adapter is not None and entry.in_unet]
        if lora:
            self._enable_lora([adapter for adapter, _ in lora], [scale for _, scale in lora])
        else:
            self._disable_lora()
        text = [(entry.adapter, item.scale) for item, entry in zip(items, entries) if entry.in_text_encoders]
        self.text_encoders.activate([adapter for adapter, _ in text], [scale for _, scale in text])
        if full:
            self.full_unet.apply(full[0][1].weights.unet_full)
        self.tokens.activate([(token_names(item.token_prefix, len(entry.weights.tokens)), entry.weights.embeddings)
                              for item, entry in zip(items, entries) if entry.weights.embeddings])
        self.current = None
        self.active = tuple(item.key for item in items)

    def _load(self, key: str, weights: TrainedWeights, label: str, keep: set[str]) -> _Loaded:
        self.tokens.check(weights.embeddings, label)
        if weights.unet_full is not None:
            self.full_unet.check(weights.unet_full, label)
            for other in [k for k, e in self.loaded.items() if e.weights.unet_full is not None and k not in keep]:
                del self.loaded[other]  # a whole UNet is large: keep one such set of weights in memory
            entry = _Loaded(None, weights)
        elif weights.lora is None and not weights.text_encoder_loras:  # an embedding file alone: new tokens only
            self._evict_to(self.max_loaded - 1, keep)
            entry = _Loaded(None, weights)
        else:
            if weights.lora is not None:
                self._check_lora(weights.lora, label)
            text_encoder_loras = self._live_text_encoder_loras(weights.text_encoder_loras)
            self.text_encoders.check(text_encoder_loras, label)
            self._evict_to(self.max_loaded - 1, keep)
            adapter = f"w{key}"
            if weights.lora is not None:
                self._load_adapter(adapter, weights.lora, label)
            self.text_encoders.load(adapter, text_encoder_loras)
            entry = _Loaded(adapter, TrainedWeights(None, None, weights.embeddings, weights.special_params),
                            in_unet=weights.lora is not None, in_text_encoders=bool(weights.text_encoder_loras))
        self.loaded[key] = entry
        return entry

    def _live_text_encoder_loras(self, loras: dict[str, PeftLora]) -> dict[str, PeftLora]:
        """Text-encoder LoRAs (canonical module names) named as this pipeline's encoders name their modules."""
        return {component: text_encoder_lora.live_lora(lora, hasattr(self.text_encoders.encoders[component],
                                                                     "text_model"))
                for component, lora in loras.items()}

    def _evict_to(self, count: int, keep: set[str] = frozenset()) -> None:
        for key in [k for k in self.loaded if k not in keep]:
            if len(self.loaded) <= count:
                return
            entry = self.loaded.pop(key)
            if entry.adapter is not None and entry.in_unet:
                self.unet.delete_adapters(entry.adapter)
            if entry.in_text_encoders:
                self.text_encoders.delete([entry.adapter])

    def _check_lora(self, lora: PeftLora, label: str) -> None:
        modules = dict(self.unet.named_modules())
        for module in lora.modules:
            target = modules.get(module)
            target = getattr(target, "base_layer", target)
            if not isinstance(target, (torch.nn.Linear, torch.nn.Conv2d)):
                raise WeightsError(f"{label}: LoRA adapts {module!r}, which this base model's UNet lacks "
                                   f"(weights trained for another base model?)")
            lora_a, lora_b = lora.state[module + ".lora_A.weight"], lora.state[module + ".lora_B.weight"]
            fan_in = target.in_features if isinstance(target, torch.nn.Linear) else target.in_channels
            fan_out = target.out_features if isinstance(target, torch.nn.Linear) else target.out_channels
            if lora_a.shape[1] != fan_in or lora_b.shape[0] != fan_out:
                raise WeightsError(f"{label}: LoRA for {module} has shapes {list(lora_a.shape)}/{list(lora_b.shape)} "
                                   f"but the layer is {fan_in}->{fan_out} (weights trained for another base model?)")

    def _load_adapter(self, adapter: str, lora: PeftLora, label: str) -> None:
        tensors = {"unet." + k: v for k, v in lora.state.items()}
        metadata = {"unet." + k: v for k, v in lora_formats.peft_adapter_metadata(lora).items()}
        try:
            with warnings.catch_warnings():
                # Several adapters in one UNet is the point here, not a mistake.
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                self.unet.load_lora_adapter(tensors, prefix="unet", adapter_name=adapter, metadata=metadata)
        except (RuntimeError, ValueError, KeyError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise WeightsError(f"{label}: LoRA does not load into this base model ({first_line})") from None
        # New LoRA layers come up enabled whatever the others are; _activate's _enable_lora makes all agree,
        # and _reset disables all if anything fails before that.


# ---------------------------------------------------------------------------------------------- facade


@dataclass(frozen=True)
class WeightsChoice:
    """One set of weights a request asks for: the source, its LoRA scale, and the input that named it."""

    source: str
    scale: float
    field: str = "replicate_weights"
    trusted: bool = False  # named by the operator (the default weights), not by a request: local paths allowed
    trigger: str | None = None  # an embedding file (``embeddings`` input): the trigger word of all its rows

    @property
    def is_embedding(self) -> bool:
        return self.trigger is not None


MAX_LORA_SCALE = 2.0


def check_lora_scale(field: str, scale: float) -> None:
    """A one-line :class:`WeightsError` naming ``field`` unless ``scale`` is within 0..MAX_LORA_SCALE."""
    if not 0 <= scale <= MAX_LORA_SCALE:
        raise WeightsError(f"{field}={scale} is outside 0..{MAX_LORA_SCALE:g}")


def _listed(value: str | Sequence[str] | None) -> list[str]:
    """One source or a list of them (a Cog input) as a list, blanks left out."""
    if value is None:
        sources: list[str] = []
    elif isinstance(value, str):
        sources = [value]
    else:
        sources = list(value)
    return [source.strip() for source in sources if source.strip()]


def extra_lora_choices(extra_lora: str | Sequence[str] | None,
                       extra_lora_scale: float | Sequence[float]) -> list[WeightsChoice]:
    """The ``extra_lora`` / ``extra_lora_scale`` inputs as choices (one scale for all, or one per LoRA); a
    one-line :class:`WeightsError` naming the input otherwise."""
    sources = _listed(extra_lora)
    scales = [extra_lora_scale] if isinstance(extra_lora_scale, (int, float)) else list(extra_lora_scale)
    if not sources:
        return []
    if len(scales) == 1:
        scales = scales * len(sources)
    if len(scales) != len(sources):
        raise WeightsError(f"extra_lora_scale has {len(scales)} scales for {len(sources)} extra_lora; give one "
                           f"for all or one per LoRA")
    for index, scale in enumerate(scales):
        check_lora_scale("extra_lora_scale" if isinstance(extra_lora_scale, (int, float))
                         else f"extra_lora_scale[{index}]", scale)
    return [WeightsChoice(source, float(scale), f"extra_lora[{index}]")
            for index, (source, scale) in enumerate(zip(sources, scales))]


TRIGGER_SUFFIX = "#trigger="


def embeddings_choices(embeddings: str | Sequence[str] | None) -> list[WeightsChoice]:
    """The ``embeddings`` input (one embedding file or a list) as choices, each with its trigger word: the file
    name without ``.safetensors`` (what A1111 and ComfyUI take), or the word after a ``#trigger=`` suffix."""
    return [embedding_choice(source, f"embeddings[{index}]") for index, source in enumerate(_listed(embeddings))]


def embedding_choice(source: str, field: str) -> WeightsChoice:
    """One embedding file's choice; a one-line :class:`WeightsError` naming ``field`` when its trigger word (file
    name or ``#trigger=`` suffix) is not one word."""
    source, suffix, trigger = source.partition(TRIGGER_SUFFIX)
    if not suffix:
        trigger = _file_stem(source, field)
    if not re.fullmatch(r"\w+", trigger):
        origin = "#trigger=" if suffix else "the file name"
        raise WeightsError(f"{field}: {origin} {trigger!r} is not one word (letters, digits, _) to use as the trigger "
                           f"word{'' if suffix else '; add #trigger=WORD to name it'}")
    return WeightsChoice(source, 1.0, field, trigger=trigger)


def _file_stem(source: str, field: str) -> str:
    """The file name of ``source`` (URL or path) without its extension."""
    kind = source_kind(source)
    if kind == "data":
        raise WeightsError(f"{field}: a data: URI has no file name to take the trigger word from; add #trigger=WORD")
    path = urllib.parse.unquote(urllib.parse.urlsplit(source).path) if kind == "url" else source
    return Path(path.rstrip("/").rpartition("/")[2]).stem


def _split_step(choice: WeightsChoice) -> tuple[str, int | None]:
    """``choice``'s source without its ``#step=<n>`` suffix, and the step (None without one)."""
    try:
        return steps.split_step(choice.source)
    except steps.StepSelectionError as error:
        raise WeightsError(f"{choice.field}: {redact(choice.source.rsplit('#step=', 1)[0])}: {error}") from None


@dataclass(frozen=True)
class ActiveWeights:
    key: str
    label: str
    field: str
    special_params: dict[str, str]  # trigger word -> this set's tokens, in its own namespace
    is_lora: bool


class WeightsManager:
    """What the predictor calls: ``use(source, lora_scale, extras)`` before generating, then
    ``expand_prompts(prompt, negative_prompt)``."""

    def __init__(self, pipelines: Sequence, settings: WeightsSettings):
        self.settings = settings
        self.cache = WeightsCache(settings)
        self.live = LiveWeights(pipelines, settings.max_loaded_adapters)
        self.layout = lora_formats.UNetLayout.from_unet_config(self.live.unet.config)
        self.active: tuple[ActiveWeights, ...] | None = None
        self._warned_missing_trigger: set[str] = set()
        self._lock = threading.Lock()

    def use(self, source: str | None, lora_scale: float, extras: Sequence[tuple[str, float]] = (),
            trusted: bool = False) -> tuple[ActiveWeights, ...] | None:
        """Make ``source`` (``replicate_weights``: URL, data: URI, or where enabled a tar or folder path; None for
        none) and each ``(source, scale)`` of ``extras`` (``extra_lora[i]``) the active weights together. Any source
        may end in ``#step=<n>`` to name a saved intermediate step of its tar."""
        choices = [WeightsChoice(source, lora_scale, "replicate_weights", trusted)] if source else []
        choices += [WeightsChoice(extra, scale, f"extra_lora[{i}]") for i, (extra, scale) in enumerate(extras)]
        return self.use_all(choices)

    def use_all(self, choices: Sequence[WeightsChoice]) -> tuple[ActiveWeights, ...] | None:
        with self._lock:
            self.active = None
            self.cache.pinned.clear()
            if not choices:
                self.live.deactivate()
                return None
            weights_sets = [choice for choice in choices if not choice.is_embedding]
            if len(weights_sets) > self.settings.max_loaded_adapters:
                raise WeightsError(f"{weights_sets[-1].field}: {len(weights_sets)} sets of weights at once; this "
                                   f"predictor takes at most {self.settings.max_loaded_adapters} "
                                   f"(WEIGHTS_MAX_LOADED_ADAPTERS)")
            items, labels, folder_keys = [], {}, {}
            for choice in choices:
                source, step = (choice.source, None) if choice.is_embedding else _split_step(choice)
                folder_key = self._key(choice, source)
                key = self._live_key(choice, folder_key, step)
                if key in labels:
                    raise WeightsError(f"{choice.field}: the same {'file' if choice.is_embedding else 'weights'} as "
                                       f"{labels[key]}; give each "
                                       f"{'once' if choice.is_embedding else 'set once (its scale can go up to 2)'}")
                labels[key] = choice.field
                folder_keys[key] = folder_key
                label = f"{choice.field} {redact(source)}" + ("" if step is None else f"#step={step}")
                items.append(Activation(key, lambda c=choice, s=source, n=step, lab=label: self._read(c, s, n, lab),
                                        choice.scale, label, self._token_prefix(choice)))
                self.cache.pinned.add(folder_key)
            started = time.perf_counter()
            try:
                loaded = self.live.activate(items)
            except StepNotSaved:
                raise  # the tar is fine: keep it for the steps it has
            except WeightsError:
                failed = self.live.current
                if failed is not None and failed not in self.live.loaded:
                    self.cache.discard(folder_keys[failed])  # weights that cannot be used would only fail again
                raise
            self.active = tuple(
                ActiveWeights(item.key, item.label, choice.field,
                              renamed_special_params(weights.special_params, item.token_prefix),
                              weights.unet_full is None)
                for item, choice, weights in zip(items, choices, loaded))
            logger.info("weights %s active after %.3fs", ", ".join(i.label for i in items),
                        time.perf_counter() - started)
            return self.active

    @staticmethod
    def _token_prefix(choice: WeightsChoice) -> str:
        """``""`` (``<s0>``) for replicate_weights, ``x0`` (``<x0s0>``) for extra_lora[0], ``e0`` (``<e0s0>``) for
        embeddings[0]."""
        match = re.fullmatch(r"(extra_lora|embeddings)\[(\d+)\]", choice.field)
        if not match:
            return ""
        return ("e" if match.group(1) == "embeddings" else "x") + match.group(2)

    @staticmethod
    def _live_key(choice: WeightsChoice, folder_key: str, step: int | None) -> str:
        """The key of a loaded set: one download serves every step of a tar (one adapter per step), and an embedding
        file its trigger words (one set of tokens per word)."""
        if choice.is_embedding:
            return f"{folder_key}e{hashlib.sha256(choice.trigger.encode()).hexdigest()[:8]}"
        return folder_key if step is None else f"{folder_key}s{step}"

    def _key(self, choice: WeightsChoice, source: str) -> str:
        """The cache key of ``source`` (``choice``'s source without its ``#step=`` suffix)."""
        if source_kind(source) == "path":
            if not (self.settings.allow_local_paths or choice.trusted):
                raise WeightsError(f"{choice.field}: local paths are not accepted here; give an http(s) URL or a "
                                   f"data: URI")
            path = Path(source).expanduser()
            if not path.exists():
                raise WeightsError(f"{choice.field}: {source}: no such file or folder")
            if path.is_dir():
                return hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
        return cache_key(source)

    def _read(self, choice: WeightsChoice, source: str, step: int | None, label: str) -> TrainedWeights:
        try:
            folder = self.cache.ensure(source, allow_path=self.settings.allow_local_paths or choice.trusted,
                                       safetensors_only=choice.is_embedding)
        except WeightsError as error:
            raise WeightsError(f"{choice.field}: {error}") from None
        if choice.is_embedding:
            return read_embedding_weights(folder, label, choice.trigger)
        log_base_mismatch(folder, label, served_base_name())
        return read_trained_weights(folder if step is None else step_weights_folder(folder, step, label), label,
                                    self.layout)

    def trigger_map(self) -> dict[str, str]:
        """Each trigger word of the active weights → the tokens it expands to (every set's own tokens, in request
        order, when several sets share a trigger word)."""
        merged: dict[str, str] = {}
        for active in self.active or ():
            for trigger, tokens in active.special_params.items():
                merged[trigger] = merged.get(trigger, "") + tokens
        return merged

    def describe_triggers(self) -> str:
        """Which trigger word expands to which tokens of which weights, for the log."""
        return "; ".join(f"{trigger} -> {tokens} ({active.label})" for active in self.active or ()
                         for trigger, tokens in active.special_params.items())

    def expand_prompt(self, prompt: str) -> str:
        """The prompt with the active weights' trigger words replaced by their tokens (warns once per weights when
        the prompt has none of their trigger words)."""
        return self.expand_prompts(prompt, "")[0]

    def expand_prompts(self, prompt: str, negative_prompt: str) -> tuple[str, str]:
        """The prompt and the negative prompt with the active weights' trigger words replaced by their tokens (a
        negative embedding works as in A1111/ComfyUI); warns once per weights when neither has their trigger words."""
        if not self.active:
            return prompt, negative_prompt
        triggers = self.trigger_map()
        expanded, _ = expand_triggers(prompt, triggers)
        expanded_negative, _ = expand_triggers(negative_prompt, triggers)
        for active in self.active:
            if not active.special_params or active.key in self._warned_missing_trigger:
                continue
            if not any(expand_triggers(text, active.special_params)[1] for text in (prompt, negative_prompt)):
                self._warned_missing_trigger.add(active.key)
                logger.warning("prompt has none of the trigger words %s of %s; the trained concept may not show",
                               ", ".join(active.special_params), active.label)
        if expanded != prompt or expanded_negative != negative_prompt:
            logger.info("trigger words: %s", self.describe_triggers())
        return expanded, expanded_negative

    def tokenizers(self) -> list:
        """The tokenizers the pipelines use right now (with the active weights' tokens)."""
        return self.live.tokens.active_tokenizers()
