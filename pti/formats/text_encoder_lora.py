"""Key layouts of LoRA adapters on the two SDXL text encoders. Pure functions on state dicts.

Module names are kept in one *canonical* form, the CLIP path with ``text_model.``
(``text_model.encoder.layers.3.self_attn.q_proj``): what diffusers and kohya files name, whatever the live encoder
calls it (transformers 5 flattens ``CLIPTextModel``, so the first SDXL encoder's modules there lack ``text_model.``;
:func:`live_module` maps back).

Layouts:

* **PEFT** (training, and the predictor's adapters): ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``, the
  scale ``alpha / rank`` in the adapter config; one :class:`PeftLora` per encoder, by diffusers component name
  (``text_encoder``, ``text_encoder_2``).
* **diffusers file** (``pytorch_lora_weights.safetensors``): ``text_encoder.<canonical module>.lora_A.weight`` and
  ``text_encoder_2.…``, the adapter config under ``lora_adapter_metadata`` with keys prefixed ``text_encoder.`` /
  ``text_encoder_2.``: what ``StableDiffusionXLPipeline.load_lora_weights`` reads. Its ``target_modules`` and
  patterns name modules without ``text_model.``, which PEFT matches as a suffix in either transformers layout.
* **kohya** (A1111/Forge, ComfyUI, kohya tools): ``lora_te1_<canonical module with _>`` for the first encoder
  (CLIP ViT-L), ``lora_te2_`` for the second (OpenCLIP bigG), ``.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha``.
"""

from __future__ import annotations

import json
import re

import torch
from torch import Tensor

from pti.formats.peft_lora import LoraFormatError, PeftLora, peft_modules

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # diffusers component names, first and second SDXL encoder
KOHYA_PREFIXES = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
TEXT_MODEL = "text_model."
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")  # what training adapts (CLIPAttention)
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"

_PEFT_A, _PEFT_B = ".lora_A.weight", ".lora_B.weight"
_KOHYA_DOWN, _KOHYA_UP, _KOHYA_ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
# The CLIP layers a text-encoder LoRA may adapt (kohya also trains the MLP: fc1/fc2).
_MODULE_RE = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$")
_KOHYA_RE = re.compile(r"^text_model_encoder_layers_(\d+)_(self_attn_(q_proj|k_proj|v_proj|out_proj)|mlp_(fc1|fc2))$")
# Older diffusers text-encoder names: ``….lora_linear_layer.down.weight`` (0.17-0.24) and ``….lora.down.weight``.
_OLD_SUFFIXES = ((".lora_linear_layer.down.weight", _PEFT_A), (".lora_linear_layer.up.weight", _PEFT_B),
                 (".lora.down.weight", _PEFT_A), (".lora.up.weight", _PEFT_B))

TextEncoderLoras = dict[str, PeftLora]  # component name -> that encoder's LoRA (canonical module names)


def canonical_module(name: str) -> str:
    """A live encoder's module path in canonical form: ``encoder.layers.0.self_attn.q_proj`` →
    ``text_model.encoder.layers.0.self_attn.q_proj``; refuses paths that are not an adaptable CLIP layer."""
    canonical = name if name.startswith(TEXT_MODEL) else TEXT_MODEL + name
    if not _MODULE_RE.match(canonical):
        raise LoraFormatError(f"text-encoder module {name!r} is not a CLIP attention projection or MLP layer")
    return canonical


def live_module(canonical: str, has_text_model: bool) -> str:
    """The inverse of :func:`canonical_module` for an encoder that has (or, flattened, lacks) ``text_model``."""
    return canonical if has_text_model else canonical.removeprefix(TEXT_MODEL)


def live_lora(lora: PeftLora, has_text_model: bool) -> PeftLora:
    """A LoRA in canonical names renamed to a live encoder's module paths (see :func:`live_module`)."""
    state = {}
    for module in lora.modules:
        live = live_module(module, has_text_model)
        state[live + _PEFT_A] = lora.state[module + _PEFT_A]
        state[live + _PEFT_B] = lora.state[module + _PEFT_B]
    return PeftLora(state, {live_module(m, has_text_model): a for m, a in lora.alphas.items()})


def pattern_module(canonical: str) -> str:
    """The name of a module in adapter metadata (``target_modules``, rank/alpha patterns): without ``text_model.``,
    which PEFT matches as a suffix of the module path in either transformers layout."""
    return canonical.removeprefix(TEXT_MODEL)


def canonical_lora(state: dict[str, Tensor], alpha: float) -> PeftLora:
    """``get_peft_model_state_dict(encoder)`` (live names) with the adapter's one ``lora_alpha``, in canonical names."""
    if alpha <= 0:
        raise LoraFormatError(f"lora_alpha must be positive, got {alpha}")
    renamed = {}
    for module in peft_modules(state):
        canonical = canonical_module(module)
        renamed[canonical + _PEFT_A] = state[module + _PEFT_A]
        renamed[canonical + _PEFT_B] = state[module + _PEFT_B]
    return PeftLora(renamed, {canonical_module(m): float(alpha) for m in peft_modules(state)})


def _check_encoder(encoder: str) -> None:
    if encoder not in TEXT_ENCODERS:
        raise LoraFormatError(f"unknown text encoder {encoder!r}; expected one of {', '.join(TEXT_ENCODERS)}")


# ---------------------------------------------------------------- kohya


def kohya_layer_name(encoder: str, module: str) -> str:
    """``("text_encoder_2", "text_model.encoder.layers.3.self_attn.q_proj")`` →
    ``lora_te2_text_model_encoder_layers_3_self_attn_q_proj``."""
    _check_encoder(encoder)
    return KOHYA_PREFIXES[encoder] + canonical_module(module).replace(".", "_")


def module_from_kohya(layer: str) -> tuple[str, str]:
    """The inverse of :func:`kohya_layer_name`: (encoder, canonical module)."""
    for encoder, prefix in KOHYA_PREFIXES.items():
        if layer.startswith(prefix):
            match = _KOHYA_RE.match(layer[len(prefix):])
            if not match:
                break
            index, _, attention, mlp = match.groups()
            part = f"self_attn.{attention}" if attention else f"mlp.{mlp}"
            return encoder, f"text_model.encoder.layers.{index}.{part}"
    raise LoraFormatError(f"kohya text-encoder LoRA layer {layer!r} is not lora_te1_/lora_te2_ followed by a CLIP "
                          "attention or MLP layer (text_model_encoder_layers_N_self_attn_q_proj, …_mlp_fc1)")


def is_kohya_key(key: str) -> bool:
    return key.startswith(tuple(KOHYA_PREFIXES.values()))


def to_kohya(loras: TextEncoderLoras) -> dict[str, Tensor]:
    """Both encoders' LoRAs as kohya keys (``lora_te1_…`` / ``lora_te2_…``, ``.alpha`` as a float32 scalar)."""
    out: dict[str, Tensor] = {}
    for encoder, lora in loras.items():
        if lora.use_dora:
            raise LoraFormatError("a text-encoder DoRA has no kohya layout; use the diffusers file")
        for module in lora.modules:
            layer = kohya_layer_name(encoder, module)
            out[layer + _KOHYA_DOWN] = lora.state[module + _PEFT_A]
            out[layer + _KOHYA_UP] = lora.state[module + _PEFT_B]
            out[layer + _KOHYA_ALPHA] = torch.tensor(lora.alphas[module], dtype=torch.float32)
    return out


def from_kohya(state: dict[str, Tensor]) -> TextEncoderLoras:
    """The ``lora_te1_``/``lora_te2_`` keys of a kohya file (others ignored) → per-encoder PEFT LoRAs; a layer
    without ``.alpha`` gets alpha = rank (scale 1), as kohya's tools assume."""
    layers: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        if not is_kohya_key(key):
            continue
        layer, dot, suffix = key.partition(".")
        if "." + suffix not in (_KOHYA_DOWN, _KOHYA_UP, _KOHYA_ALPHA):
            raise LoraFormatError(f"kohya text-encoder LoRA key {key!r} has an unknown suffix {suffix!r}")
        layers.setdefault(layer, {})["." + suffix] = value
    states: dict[str, dict[str, Tensor]] = {}
    alphas: dict[str, dict[str, float]] = {}
    for layer, parts in sorted(layers.items()):
        if _KOHYA_DOWN not in parts or _KOHYA_UP not in parts:
            raise LoraFormatError(f"kohya text-encoder LoRA layer {layer!r} lacks its lora_down or lora_up weight")
        encoder, module = module_from_kohya(layer)
        down = parts[_KOHYA_DOWN]
        states.setdefault(encoder, {})[module + _PEFT_A] = down
        states[encoder][module + _PEFT_B] = parts[_KOHYA_UP]
        alpha = parts.get(_KOHYA_ALPHA)
        alphas.setdefault(encoder, {})[module] = float(alpha.item()) if alpha is not None else float(down.shape[0])
    return {encoder: PeftLora(states[encoder], alphas[encoder]) for encoder in TEXT_ENCODERS if encoder in states}


# ---------------------------------------------------------------- diffusers file


def adapter_metadata(lora: PeftLora) -> dict:
    """The ``LoraConfig`` fields diffusers rebuilds a text encoder's adapter from."""
    ranks, alphas = lora.ranks, lora.alphas
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {pattern_module(m): v for m, v in ranks.items() if v != r},
        "alpha_pattern": {pattern_module(m): v for m, v in alphas.items() if v != alpha},
        "target_modules": sorted(pattern_module(m) for m in lora.modules),
        "use_dora": False,
        "lora_bias": False,
    }


def to_diffusers(loras: TextEncoderLoras) -> tuple[dict[str, Tensor], dict]:
    """``text_encoder.…``/``text_encoder_2.…`` tensors and their adapter configs (keys prefixed the same way), to be
    merged with the UNet's into ``pytorch_lora_weights.safetensors`` and its ``lora_adapter_metadata``."""
    tensors: dict[str, Tensor] = {}
    config: dict = {}
    for encoder, lora in loras.items():
        _check_encoder(encoder)
        if lora.use_dora:
            raise LoraFormatError("text-encoder LoRAs are plain LoRAs; DoRA is not supported there")
        tensors.update({f"{encoder}.{k}": v for k, v in lora.state.items()})
        config.update({f"{encoder}.{k}": v for k, v in adapter_metadata(lora).items()})
    return tensors, config


def is_diffusers_key(key: str) -> bool:
    return key.startswith(tuple(f"{encoder}." for encoder in TEXT_ENCODERS))


def _new_names(key: str) -> str:
    for old, new in _OLD_SUFFIXES:
        if key.endswith(old):
            return key[: -len(old)] + new
    return key


def from_diffusers(tensors: dict[str, Tensor], metadata: dict[str, str] | None) -> TextEncoderLoras:
    """The ``text_encoder.``/``text_encoder_2.`` keys of a diffusers file (others ignored) → per-encoder PEFT LoRAs,
    alphas from ``lora_adapter_metadata`` (without it, alpha = rank: scale 1, as diffusers then assumes)."""
    packed = json.loads((metadata or {}).get(LORA_ADAPTER_METADATA_KEY, "{}"))
    out: TextEncoderLoras = {}
    for encoder in TEXT_ENCODERS:
        prefix = encoder + "."
        state = {}
        for key, value in tensors.items():
            if key.startswith(prefix):
                module_key = _new_names(key[len(prefix):])
                module, _, suffix = module_key.rpartition(".lora_")
                state[canonical_module(module) + ".lora_" + suffix] = value
        if not state:
            continue
        modules = peft_modules(state)
        if any(k.endswith(".lora_magnitude_vector") for k in state):
            raise LoraFormatError(f"the {encoder} LoRA is a DoRA, which this predictor applies to the UNet only")
        config = {k[len(prefix):]: v for k, v in packed.items() if k.startswith(prefix)}
        if not config:
            out[encoder] = PeftLora(state, {m: float(state[m + _PEFT_A].shape[0]) for m in modules})
            continue
        pattern = config.get("alpha_pattern", {})
        out[encoder] = PeftLora(state, {m: float(pattern.get(pattern_module(m), config["lora_alpha"]))
                                        for m in modules})
    return out
