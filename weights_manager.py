"""Trained weights, hot: read trained-weights folders and switch them on a live SDXL pipeline.

* :func:`read_trained_weights` reads a folder in this project's artifact layout or replicate/cog-sdxl's
  (``lora.safetensors`` with attention-processor keys, ``embeddings.pti``), or a bare kohya/diffusers LoRA file
  (embeddings and trigger words from its ``bundle_emb`` keys, if any), into one :class:`TrainedWeights`.
* :class:`LiveWeights` keeps a bounded set of PEFT adapters loaded in the UNet by name and swaps the new-token
  embeddings with them. Only one adapter is active at a time; without weights the pipeline is the clean base
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

from pti.formats import lora_formats, sgm_checkpoint, steps
from pti.formats.lora_formats import SDXL_UNET_LAYOUT, LoraFormatError, PeftLora, UNetLayout
from pti.models import single_file
from pti.models.base_model import model_spec
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
    """One trained model in memory: a UNet LoRA (PEFT layout) or full UNet weights, the new-token embeddings
    (``clip_l``/``clip_g``, rows in ``<s0>…<sN>`` order) and the trigger words."""

    lora: PeftLora | None
    unet_full: dict[str, Tensor] | None
    embeddings: dict[str, Tensor]
    special_params: dict[str, str]

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
        lora, unet_full = _read_unet_weights(folder, label)
        embeddings = _read_embeddings(folder, label)
    except LoraFormatError as error:
        raise WeightsError(f"{label}: {error}") from None
    widths = {name: t.shape[0] for name, t in embeddings.items()}
    if len(set(widths.values())) > 1:
        raise WeightsError(f"{label}: embeddings have different token counts {widths}")
    return TrainedWeights(lora, unet_full, embeddings, read_special_params(folder, label))


def _read_bare_lora(path: Path, label: str, layout: UNetLayout) -> TrainedWeights:
    tensors, metadata = _read_safetensors(path, label)
    try:
        read = lora_formats.read_lora_file(tensors, metadata, layout)
    except LoraFormatError as error:
        raise WeightsError(f"{label}: {error}") from None
    return TrainedWeights(read.lora, None, read.embeddings, read.special_params)


def _read_unet_weights(folder: Path, label: str) -> tuple[PeftLora | None, dict[str, Tensor] | None]:
    if (folder / OUR_LORA).is_file():
        tensors, metadata = _read_safetensors(folder / OUR_LORA, label)
        return lora_formats.diffusers_file_to_peft(tensors, metadata), None
    if (folder / COG_SDXL_LORA).is_file():
        tensors, _ = _read_safetensors(folder / COG_SDXL_LORA, label)
        return lora_formats.cog_sdxl_lora_to_peft(tensors), None
    if (folder / FULL_CHECKPOINT).is_file():
        return None, _read_checkpoint_unet(folder / FULL_CHECKPOINT, label)
    if (folder / FULL_UNET).is_file():
        return None, _read_safetensors(folder / FULL_UNET, label)[0]
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


class TokenTables:
    """The new tokens ``<s0>…<sN>`` of the active weights: tokenizers that know them, embedding rows behind them.

    The base tokenizers are never changed; an extended copy per token count is swapped onto the pipelines while
    trained weights are active. The text encoders' embedding tables grow once (rows appended, existing rows
    untouched), and the active weights' vectors are written into the appended rows. The base tokenizers never
    produce those ids, so the base model's outputs do not depend on them.
    """

    ENCODER_NAMES = (("tokenizer", "text_encoder", "clip_l"), ("tokenizer_2", "text_encoder_2", "clip_g"))

    def __init__(self, pipelines: Sequence):
        self.pipelines = list(pipelines)
        base = self.pipelines[0]
        self.base_tokenizers = {tok: getattr(base, tok) for tok, _, _ in self.ENCODER_NAMES}
        self.encoders = {key: getattr(base, enc) for _, enc, key in self.ENCODER_NAMES}
        self.base_vocab = {tok: len(t) for tok, t in self.base_tokenizers.items()}
        self._extended: dict[int, dict[str, object]] = {}

    def check(self, embeddings: dict[str, Tensor], label: str) -> None:
        """Refuse embeddings whose width is not this base model's."""
        for key, table in embeddings.items():
            width = self.encoders[key].get_input_embeddings().weight.shape[1]
            if table.dim() != 2 or table.shape[1] != width:
                raise WeightsError(f"{label}: {key} embeddings have shape {list(table.shape)} but this base model's "
                                   f"text encoder has width {width} (weights trained for another base model?)")

    def activate(self, embeddings: dict[str, Tensor]) -> None:
        n = next(iter(embeddings.values())).shape[0] if embeddings else 0
        if n == 0:
            self.deactivate()
            return
        for tok, _, key in self.ENCODER_NAMES:
            weight = self._grown(key, self.base_vocab[tok] + n).weight
            start = self.base_vocab[tok]
            with torch.no_grad():
                weight[start:start + n] = embeddings[key].to(device=weight.device, dtype=weight.dtype)
        self._set_tokenizers(self._extended_tokenizers(n))

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

    def _extended_tokenizers(self, n: int) -> dict[str, object]:
        if n not in self._extended:
            tokens = [f"<s{i}>" for i in range(n)]
            extended = {}
            for name, base in self.base_tokenizers.items():
                tokenizer = copy.deepcopy(base)
                tokenizer.add_tokens(tokens, special_tokens=True)
                ids = tokenizer.convert_tokens_to_ids(tokens)
                if ids != list(range(self.base_vocab[name], self.base_vocab[name] + n)):
                    raise RuntimeError(f"{name}: new tokens got ids {ids}, expected them after the base vocabulary")
                extended[name] = tokenizer
            self._extended[n] = extended
        return self._extended[n]

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
    """A trained model whose adapter sits in the UNet (or, for full UNet weights, whose tensors are in memory)."""

    adapter: str | None
    weights: TrainedWeights = field(repr=False)


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


class LiveWeights:
    """Switches trained weights on the pipelines (the first one owns the UNet; all share the text encoders).

    ``activate(key, read, lora_scale)`` makes ``key`` the active weights, reading them with ``read()`` only when
    their adapter is not already loaded; ``deactivate()`` returns to the clean base. At most
    ``max_loaded`` adapters stay loaded, least recently used evicted. Any exception (or cancellation) during a
    switch leaves the pipelines on the base model, with no half-loaded adapter.
    """

    def __init__(self, pipelines: Sequence, max_loaded: int):
        self.pipelines = list(pipelines)
        self.unet = self.pipelines[0].unet
        self.tokens = TokenTables(self.pipelines)
        self.full_unet = FullUnetPatch(self.unet)
        self.max_loaded = max(1, max_loaded)
        self.loaded: OrderedDict[str, _Loaded] = OrderedDict()
        self.active: str | None = None
        self._consistent = True
        self._lora_enabled = False  # whether the UNet's LoRA layers are switched on (tracked: toggling walks it)

    def activate(self, key: str, read: Callable[[], TrainedWeights], lora_scale: float, label: str) -> TrainedWeights:
        self._switch(lambda: self._activate(key, read, lora_scale, label))
        return self.loaded[key].weights

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

    def _enable_lora(self, adapter: str, scale: float) -> None:
        # Each of these walks every UNet module, so only what changes is done.
        self.unet.set_adapters([adapter], weights=[scale])
        if not self._lora_enabled:
            self.unet.enable_lora()
            self._lora_enabled = True

    def _activate(self, key: str, read: Callable[[], TrainedWeights], lora_scale: float, label: str) -> None:
        entry = self.loaded.get(key)
        if entry is None:
            entry = self._load(key, read(), label)
        self.loaded.move_to_end(key)
        weights = entry.weights
        if entry.adapter is not None:
            self._enable_lora(entry.adapter, lora_scale)
        else:
            self._disable_lora()
            self.full_unet.apply(weights.unet_full)
        self.tokens.activate(weights.embeddings)
        self.active = key

    def _load(self, key: str, weights: TrainedWeights, label: str) -> _Loaded:
        self.tokens.check(weights.embeddings, label)
        if weights.unet_full is not None:
            self.full_unet.check(weights.unet_full, label)
            for other in [k for k, e in self.loaded.items() if e.adapter is None]:
                del self.loaded[other]  # a whole UNet is large: keep one such set of weights in memory
            entry = _Loaded(None, weights)
        else:
            self._check_lora(weights.lora, label)
            self._evict_to(self.max_loaded - 1)
            adapter = f"w{key}"
            self._load_adapter(adapter, weights.lora, label)
            entry = _Loaded(adapter, TrainedWeights(None, None, weights.embeddings, weights.special_params))
        self.loaded[key] = entry
        return entry

    def _evict_to(self, count: int) -> None:
        while len(self.loaded) > count:
            _, entry = self.loaded.popitem(last=False)
            if entry.adapter is not None:
                self.unet.delete_adapters(entry.adapter)

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
class ActiveWeights:
    key: str
    label: str
    special_params: dict[str, str]
    is_lora: bool


class WeightsManager:
    """What the predictor calls: ``use(source, lora_scale)`` before generating, then ``expand_prompt(prompt)``."""

    def __init__(self, pipelines: Sequence, settings: WeightsSettings):
        self.settings = settings
        self.cache = WeightsCache(settings)
        self.live = LiveWeights(pipelines, settings.max_loaded_adapters)
        self.active: ActiveWeights | None = None
        self._warned_missing_trigger: set[str] = set()
        self._lock = threading.Lock()

    def use(self, source: str | None, lora_scale: float) -> ActiveWeights | None:
        """Make ``source`` (URL, data: URI, tar or folder path, optionally ending in ``#step=<n>`` for a saved
        intermediate step; None for the base model) the active weights."""
        with self._lock:
            self.active = None
            self.cache.pinned.clear()
            if not source:
                self.live.deactivate()
                return None
            try:
                source, step = steps.split_step(source)
            except steps.StepSelectionError as error:
                raise WeightsError(f"{redact(source.rsplit('#step=', 1)[0])}: {error}") from None
            label = redact(source) + ("" if step is None else f"#step={step}")
            key = self._key(source)
            live_key = key if step is None else f"{key}s{step}"  # one download, one adapter per step
            started = time.perf_counter()
            self.cache.pinned.add(key)
            try:
                weights = self.live.activate(live_key, lambda: self._read(source, label, step), lora_scale, label)
            except StepNotSaved:
                raise  # the tar is fine: keep it for the steps it has
            except WeightsError:
                self.cache.discard(key)  # weights that cannot be used would only fail again: free their room
                raise
            logger.info("weights %s active after %.3fs", label, time.perf_counter() - started)
            self.active = ActiveWeights(live_key, label, dict(weights.special_params), weights.unet_full is None)
            return self.active

    def _key(self, source: str) -> str:
        if source_kind(source) == "path":
            path = Path(source).expanduser()
            if not path.exists():
                raise WeightsError(f"{source}: no such file or folder")
            if path.is_dir():
                return hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
        return cache_key(source)

    def _read(self, source: str, label: str, step: int | None = None) -> TrainedWeights:
        folder = self.cache.ensure(source)
        log_base_mismatch(folder, label, served_base_name())
        layout = UNetLayout.from_unet_config(self.live.unet.config)
        return read_trained_weights(folder if step is None else step_weights_folder(folder, step, label), label,
                                    layout)

    def expand_prompt(self, prompt: str) -> str:
        """The prompt with the active weights' trigger words replaced by their tokens (warns once per weights when
        the prompt has none of them)."""
        if self.active is None or not self.active.special_params:
            return prompt
        expanded, found = expand_triggers(prompt, self.active.special_params)
        if not found and self.active.key not in self._warned_missing_trigger:
            self._warned_missing_trigger.add(self.active.key)
            logger.warning("prompt has none of the trigger words %s of %s; the trained concept may not show",
                           ", ".join(self.active.special_params), self.active.label)
        return expanded

    def tokenizers(self) -> list:
        """The tokenizers the pipelines use right now (with the active weights' tokens)."""
        return self.live.tokens.active_tokenizers()
