"""Key-layout converters for SDXL UNet LoRA weights and pivotal-tuning embeddings. Pure functions on state dicts.

Layouts:

* **PEFT** (what training produces, ``peft.get_peft_model_state_dict(unet)``): diffusers module paths,
  ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``, DoRA ``<module>.lora_magnitude_vector``; the scale
  ``lora_alpha / r`` lives in the adapter config, not in the tensors.
* **diffusers file** (``pytorch_lora_weights.safetensors``): the PEFT keys prefixed ``unet.``, the adapter config
  as JSON under the safetensors metadata key ``lora_adapter_metadata`` (keys prefixed ``unet.``), which is what
  ``StableDiffusionXLPipeline.load_lora_weights`` reads.
* **kohya** (one-file LoRA for A1111/Forge, ComfyUI, kohya tools): ``lora_unet_<module>`` where ``<module>`` is the
  path in the original SGM/LDM SDXL UNet (``input_blocks.4.1.transformer_blocks.0.attn1.to_q``) with dots turned
  into underscores; ``.lora_down.weight`` (= lora_A), ``.lora_up.weight`` (= lora_B), ``.alpha`` (0-d, the scale
  is ``alpha / rank``). No DoRA: PEFT's DoRA divides each *output row* of ``W + scale·BA`` by its norm, and no
  consumer of this layout applies that (A1111 divides each input column, so does ComfyUI/Forge for a
  ``[1, in]`` ``dora_scale``, while their ``[out, 1]`` branch divides by the norm of the *base* weight; kohya's
  loaders ignore ``dora_scale``), so a DoRA adapter is refused here and shipped in the diffusers file only.
* **bare LoRA files** (what civitai and the Hugging Face hub serve): a kohya file (above, with or without
  ``bundle_emb``), a diffusers file (today's or the older ``.lora.down/up`` names) or cog-sdxl processor keys;
  :func:`read_lora_file` reads any of them, with their SDXL text-encoder layers (:mod:`text_encoder_lora`).
* **cog-sdxl legacy** (replicate/cog-sdxl tars): attention-processor keys
  ``<attention>.processor.to_q_lora.down.weight`` / ``.up.weight`` (``to_out_lora`` for ``to_out.0``), no alpha
  (scale 1), and ``embeddings.pti`` with ``text_encoders_0`` / ``text_encoders_1``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pti.formats import text_encoder_lora
# PeftLora, peft_modules and LoraFormatError are shared with text_encoder_lora (and stay importable from here).
from pti.formats.peft_lora import _PEFT_A, _PEFT_B, LoraFormatError, PeftLora, peft_modules

KOHYA_PREFIX = "lora_unet_"
KOHYA_TEXT_ENCODER_PREFIXES = ("lora_te1_", "lora_te2_")  # SDXL's two text encoders (pti.formats.text_encoder_lora)
BUNDLE_EMB_PREFIX = "bundle_emb."
DIFFUSERS_UNET_PREFIX = "unet."
DIFFUSERS_TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.")
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY

_KOHYA_DOWN, _KOHYA_UP, _KOHYA_ALPHA, _KOHYA_DORA = ".lora_down.weight", ".lora_up.weight", ".alpha", ".dora_scale"


@dataclass(frozen=True)
class UNetLayout:
    """The block structure needed to translate diffusers UNet paths to SGM ``input_blocks``/``output_blocks`` ones.

    ``layers_per_block[i]`` is the number of resnets in down block ``i`` (the SGM ``num_res_blocks``; up block
    ``i`` has one more); ``up_block_has_attention[i]`` says whether up block ``i`` is a cross-attention block
    (its upsampler is then SGM sub-module 2, else 1).
    """

    layers_per_block: tuple[int, ...]
    up_block_has_attention: tuple[bool, ...]

    @classmethod
    def from_unet_config(cls, config) -> UNetLayout:
        """From a ``UNet2DConditionModel.config`` (or any object/dict with the same fields)."""
        get = config.get if isinstance(config, dict) else lambda key: getattr(config, key)
        down_types = tuple(get("down_block_types"))
        per_block = get("layers_per_block")
        counts = tuple(per_block) if isinstance(per_block, (list, tuple)) else (int(per_block),) * len(down_types)
        return cls(counts, tuple("CrossAttn" in t for t in get("up_block_types")))

    def first_input_block(self, block: int) -> int:
        """SGM ``input_blocks`` index of down block ``block``'s first layer."""
        return 1 + sum(n + 1 for n in self.layers_per_block[:block])

    def up_layer_counts(self) -> list[int]:
        """Layers per up block (one more than the mirrored down block)."""
        return [n + 1 for n in reversed(self.layers_per_block)]

    def first_output_block(self, block: int) -> int:
        """SGM ``output_blocks`` index of up block ``block``'s first layer."""
        return sum(self.up_layer_counts()[:block])


SDXL_UNET_LAYOUT = UNetLayout(layers_per_block=(2, 2, 2), up_block_has_attention=(True, True, False))

# ---------------------------------------------------------------- diffusers module path <-> SGM module path

_DIFFUSERS_TO_SGM_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_SGM_TO_DIFFUSERS_TOP = {v: k for k, v in _DIFFUSERS_TO_SGM_TOP.items()}
_RESNET_TO_SGM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_SGM_TO_RESNET = {v: k for k, v in _RESNET_TO_SGM.items()}
_MID_TO_SGM = {"resnets.0": "0", "attentions.0": "1", "resnets.1": "2"}
_SGM_TO_MID = {v: k for k, v in _MID_TO_SGM.items()}

_BLOCK_RE = re.compile(
    r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.+))?$")
_MID_RE = re.compile(r"^mid_block\.(resnets\.\d+|attentions\.\d+)(?:\.(.+))?$")
_SGM_BLOCK_RE = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.(\d+)(?:\.(.+))?$")
_SGM_MID_RE = re.compile(r"^middle_block\.(\d+)(?:\.(.+))?$")


def _resnet_inner_to_sgm(inner: str, name: str) -> str:
    head, _, rest = inner.partition(".")
    if head not in _RESNET_TO_SGM:
        raise LoraFormatError(f"UNet module {name!r}: unknown resnet layer {head!r}")
    return _RESNET_TO_SGM[head] + ("." + rest if rest else "")


def _resnet_inner_from_sgm(inner: str, name: str) -> str:
    for sgm, diffusers in _SGM_TO_RESNET.items():
        if inner == sgm or inner.startswith(sgm + "."):
            return diffusers + inner[len(sgm):]
    raise LoraFormatError(f"SGM UNet module {name!r}: unknown resnet layer {inner!r}")


def _join(*parts: str | None) -> str:
    return ".".join(p for p in parts if p)


def diffusers_module_to_sgm(name: str, layout: UNetLayout = SDXL_UNET_LAYOUT) -> str:
    """The SGM UNet path of a diffusers UNet module, e.g. (SDXL)
    ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` →
    ``input_blocks.4.1.transformer_blocks.0.attn1.to_q``."""
    for top, sgm in _DIFFUSERS_TO_SGM_TOP.items():
        if name == top or name.startswith(top + "."):
            return sgm + name[len(top):]
    if match := _MID_RE.match(name):
        part, inner = match.groups()
        if part not in _MID_TO_SGM:
            raise LoraFormatError(f"UNet module {name!r}: mid_block has no {part!r} in the SGM UNet")
        if part.startswith("resnets"):
            inner = _resnet_inner_to_sgm(inner, name) if inner else inner
        return _join("middle_block", _MID_TO_SGM[part], inner)
    match = _BLOCK_RE.match(name)
    if not match:
        raise LoraFormatError(f"UNet module {name!r} has no counterpart in the SGM SDXL UNet")
    blocks, block_s, kind, layer_s, inner = match.groups()
    block, layer = int(block_s), int(layer_s)
    n_blocks = len(layout.layers_per_block)
    if block >= n_blocks:
        raise LoraFormatError(f"UNet module {name!r}: block {block} does not exist in a UNet with {n_blocks} blocks")
    if kind == "resnets":
        inner = _resnet_inner_to_sgm(inner, name) if inner else inner
    if blocks == "down_blocks":
        first = layout.first_input_block(block)
        if kind == "downsamplers":
            inner = "op" + inner[len("conv"):] if inner and inner.startswith("conv") else inner
            return _join("input_blocks", str(first + layout.layers_per_block[block]), "0", inner)
        return _join("input_blocks", str(first + layer), "0" if kind == "resnets" else "1", inner)
    first = layout.first_output_block(block)
    if kind == "upsamplers":
        last = first + layout.up_layer_counts()[block] - 1
        return _join("output_blocks", str(last), "2" if layout.up_block_has_attention[block] else "1", inner)
    return _join("output_blocks", str(first + layer), "0" if kind == "resnets" else "1", inner)


def sgm_module_to_diffusers(name: str, layout: UNetLayout = SDXL_UNET_LAYOUT) -> str:
    """The inverse of :func:`diffusers_module_to_sgm`."""
    for sgm, top in _SGM_TO_DIFFUSERS_TOP.items():
        if name == sgm or name.startswith(sgm + "."):
            return top + name[len(sgm):]
    if match := _SGM_MID_RE.match(name):
        index, inner = match.groups()
        if index not in _SGM_TO_MID:
            raise LoraFormatError(f"SGM UNet module {name!r}: middle_block has no sub-module {index}")
        part = _SGM_TO_MID[index]
        if part.startswith("resnets") and inner:
            inner = _resnet_inner_from_sgm(inner, name)
        return _join("mid_block", part, inner)
    match = _SGM_BLOCK_RE.match(name)
    if not match:
        raise LoraFormatError(f"module {name!r} is not a path in the SGM SDXL UNet")
    blocks, index_s, sub_s, inner = match.groups()
    index, sub = int(index_s), int(sub_s)
    if blocks == "input_blocks":
        return _sgm_input_to_diffusers(index, sub, inner, name, layout)
    return _sgm_output_to_diffusers(index, sub, inner, name, layout)


def _sgm_input_to_diffusers(index: int, sub: int, inner: str | None, name: str, layout: UNetLayout) -> str:
    for block, count in enumerate(layout.layers_per_block):
        first = layout.first_input_block(block)
        if first <= index < first + count:
            layer = index - first
            if sub == 0:
                return _join("down_blocks", str(block), "resnets", str(layer),
                             _resnet_inner_from_sgm(inner, name) if inner else inner)
            if sub == 1:
                return _join("down_blocks", str(block), "attentions", str(layer), inner)
        if index == first + count and sub == 0 and block < len(layout.layers_per_block) - 1:
            inner = "conv" + inner[len("op"):] if inner and inner.startswith("op") else inner
            return _join("down_blocks", str(block), "downsamplers", "0", inner)
    raise LoraFormatError(f"SGM UNet module {name!r} does not exist in this UNet layout")


def _sgm_output_to_diffusers(index: int, sub: int, inner: str | None, name: str, layout: UNetLayout) -> str:
    for block, count in enumerate(layout.up_layer_counts()):
        first = layout.first_output_block(block)
        if not first <= index < first + count:
            continue
        upsampler_sub = 2 if layout.up_block_has_attention[block] else 1
        if sub == upsampler_sub and index == first + count - 1:
            return _join("up_blocks", str(block), "upsamplers", "0", inner)
        if sub == 0:
            return _join("up_blocks", str(block), "resnets", str(index - first),
                         _resnet_inner_from_sgm(inner, name) if inner else inner)
        if sub == 1 and layout.up_block_has_attention[block]:
            return _join("up_blocks", str(block), "attentions", str(index - first), inner)
    raise LoraFormatError(f"SGM UNet module {name!r} does not exist in this UNet layout")


# ---------------------------------------------------------------- kohya layer names

# Identifiers that contain an underscore, longest first: kohya names replace every "." with "_", so these
# are re-joined when a name is turned back into a module path.
_UNDERSCORED_WORDS = sorted(
    {
        "input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "transformer_blocks",
        "to_q", "to_k", "to_v", "to_out", "proj_in", "proj_out", "in_layers", "out_layers", "emb_layers",
        "skip_connection", "down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "conv_norm_out",
        "time_emb_proj", "conv_shortcut", "time_embedding", "add_embedding", "linear_1", "linear_2",
    },
    key=lambda w: -w.count("_"),
)


def _underscored_to_dotted(flat: str) -> str:
    parts = flat.split("_")
    out: list[str] = []
    i = 0
    while i < len(parts):
        for word in _UNDERSCORED_WORDS:
            n = word.count("_") + 1
            if "_".join(parts[i:i + n]) == word:
                out.append(word)
                i += n
                break
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


def kohya_layer_name(diffusers_module: str, layout: UNetLayout = SDXL_UNET_LAYOUT) -> str:
    """The kohya layer name of a diffusers UNet module, e.g. (SDXL)
    ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` →
    ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``."""
    return KOHYA_PREFIX + diffusers_module_to_sgm(diffusers_module, layout).replace(".", "_")


def diffusers_module_from_kohya(layer: str, layout: UNetLayout = SDXL_UNET_LAYOUT) -> str:
    """The inverse of :func:`kohya_layer_name`; also accepts kohya names built from diffusers paths
    (``lora_unet_down_blocks_1_attentions_0_…``), as some trainers write for SDXL."""
    if not layer.startswith(KOHYA_PREFIX):
        raise LoraFormatError(f"kohya LoRA key {layer!r} does not start with {KOHYA_PREFIX!r}")
    dotted = _underscored_to_dotted(layer[len(KOHYA_PREFIX):])
    if dotted.startswith(("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "conv_norm_out",
                          "time_embedding.", "add_embedding.")):
        return dotted
    return sgm_module_to_diffusers(dotted, layout)


# ---------------------------------------------------------------- PEFT <-> kohya


def peft_lora(state: dict[str, Tensor], lora_alpha: float) -> PeftLora:
    """Wrap ``get_peft_model_state_dict(unet)`` with the one ``lora_alpha`` of its ``LoraConfig``."""
    if lora_alpha <= 0:
        raise LoraFormatError(f"lora_alpha must be positive, got {lora_alpha}")
    return PeftLora(dict(state), {m: float(lora_alpha) for m in peft_modules(state)})


def peft_to_kohya(lora: PeftLora, layout: UNetLayout = SDXL_UNET_LAYOUT) -> dict[str, Tensor]:
    """PEFT UNet LoRA → kohya/WebUI keys with SGM module names (what A1111/Forge/ComfyUI/kohya read for SDXL).

    A DoRA adapter is refused: no consumer of this layout applies PEFT's per-output-row decomposition (see the
    module docstring)."""
    if lora.use_dora:
        raise LoraFormatError("a DoRA adapter has no kohya-layout file: A1111, ComfyUI, Forge and kohya do not apply "
                              "PEFT's per-output-row DoRA; use the diffusers file")
    out: dict[str, Tensor] = {}
    for module in peft_modules(lora.state):
        layer = kohya_layer_name(module, layout)
        out[layer + _KOHYA_DOWN] = lora.state[module + _PEFT_A]
        out[layer + _KOHYA_UP] = lora.state[module + _PEFT_B]
        out[layer + _KOHYA_ALPHA] = torch.tensor(lora.alphas[module], dtype=torch.float32)
    return out


def kohya_to_peft(state: dict[str, Tensor], layout: UNetLayout = SDXL_UNET_LAYOUT) -> PeftLora:
    """kohya/WebUI UNet LoRA (SGM or diffusers-style names) → PEFT layout; ``bundle_emb.*`` and text-encoder
    (``lora_te1_``/``lora_te2_``, read by :func:`text_encoder_lora.from_kohya`) keys are ignored.

    A layer without ``.alpha`` gets alpha = rank (scale 1), as kohya tools assume. A ``dora_scale`` (LyCORIS
    DoRA, normalised per input column) is refused: PEFT, which applies the LoRA here, normalises per output row.
    """
    peft_state: dict[str, Tensor] = {}
    alphas: dict[str, float] = {}
    layers = _kohya_layers(state)
    for layer in layers:
        if layer + _KOHYA_UP not in state:
            raise LoraFormatError(f"kohya LoRA layer {layer!r} has lora_down but no lora_up weight")
        if layer + _KOHYA_DORA in state:
            raise LoraFormatError(f"kohya LoRA layer {layer!r} has a dora_scale (LyCORIS DoRA, normalised per input "
                                  "column), which diffusers/PEFT cannot apply; use a plain LoRA")
        module = diffusers_module_from_kohya(layer, layout)
        lora_a = state[layer + _KOHYA_DOWN]
        peft_state[module + _PEFT_A] = lora_a
        peft_state[module + _PEFT_B] = state[layer + _KOHYA_UP]
        alpha = state.get(layer + _KOHYA_ALPHA)
        alphas[module] = float(alpha.item()) if alpha is not None else float(lora_a.shape[0])
    return PeftLora(peft_state, alphas)


def _kohya_layers(state: dict[str, Tensor]) -> list[str]:
    layers = []
    for key in state:
        if key.startswith((BUNDLE_EMB_PREFIX, *KOHYA_TEXT_ENCODER_PREFIXES)):  # text encoders: text_encoder_lora
            continue
        if not key.startswith(KOHYA_PREFIX):
            raise LoraFormatError(f"key {key!r} is not a kohya UNet LoRA key (lora_unet_…), a text-encoder one "
                                  "(lora_te1_/lora_te2_) nor a bundled embedding")
        layer, _, suffix = key.partition(".")
        if "." + suffix not in (_KOHYA_DOWN, _KOHYA_UP, _KOHYA_ALPHA, _KOHYA_DORA):
            raise LoraFormatError(f"kohya LoRA key {key!r} has an unknown suffix {suffix!r}")
        if "." + suffix == _KOHYA_DOWN:
            layers.append(layer)
    if not layers:
        raise LoraFormatError("no kohya UNet LoRA weights (lora_unet_….lora_down.weight) in the state dict")
    return sorted(layers)


# ---------------------------------------------------------------- PEFT <-> diffusers file


def _most_common(values: list) -> object:
    return Counter(values).most_common(1)[0][0]


def peft_adapter_metadata(lora: PeftLora) -> dict:
    """The ``LoraConfig`` fields diffusers rebuilds the adapter from (rank/alpha patterns for odd modules)."""
    ranks, alphas = lora.ranks, lora.alphas
    r = _most_common(list(ranks.values()))
    alpha = _most_common(list(alphas.values()))
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {m: v for m, v in ranks.items() if v != r},
        "alpha_pattern": {m: v for m, v in alphas.items() if v != alpha},
        "target_modules": lora.modules,
        "use_dora": lora.use_dora,
        "lora_bias": False,
    }


def peft_to_diffusers_file(lora: PeftLora) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and safetensors metadata of ``pytorch_lora_weights.safetensors`` (``load_lora_weights`` reads it)."""
    tensors = {DIFFUSERS_UNET_PREFIX + k: v for k, v in lora.state.items()}
    packed = {DIFFUSERS_UNET_PREFIX + k: v for k, v in peft_adapter_metadata(lora).items()}
    return tensors, {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}


def diffusers_file_to_peft(tensors: dict[str, Tensor], metadata: dict[str, str] | None) -> PeftLora:
    """The inverse of :func:`peft_to_diffusers_file` (the UNet part: text-encoder keys are left to
    :func:`text_encoder_lora.from_diffusers`); without adapter metadata the scale is 1 (alpha = rank)."""
    state = {}
    for key, value in tensors.items():
        if key.startswith(DIFFUSERS_TEXT_ENCODER_PREFIXES):  # read by text_encoder_lora.from_diffusers
            continue
        if not key.startswith(DIFFUSERS_UNET_PREFIX):
            raise LoraFormatError(f"diffusers LoRA key {key!r} is not a UNet key (unet.…) nor a text-encoder one "
                                  "(text_encoder.…, text_encoder_2.…)")
        state[key[len(DIFFUSERS_UNET_PREFIX):]] = value
    modules = peft_modules(state)
    packed = json.loads((metadata or {}).get(LORA_ADAPTER_METADATA_KEY, "{}"))
    config = {k[len(DIFFUSERS_UNET_PREFIX):]: v for k, v in packed.items() if k.startswith(DIFFUSERS_UNET_PREFIX)}
    if not config:
        return PeftLora(state, {m: float(state[m + _PEFT_A].shape[0]) for m in modules})
    alpha_pattern = config.get("alpha_pattern", {})
    return PeftLora(state, {m: float(alpha_pattern.get(m, config["lora_alpha"])) for m in modules})


# ---------------------------------------------------------------- kohya file for diffusers


def peft_to_diffusers_dict(lora: PeftLora) -> dict[str, Tensor]:
    """A state dict for ``load_lora_weights(dict)``: ``unet.``-prefixed PEFT keys with each module's
    ``alpha / rank`` folded into ``lora_B``, because a dict carries no adapter config and diffusers then uses
    scale 1. Folding is exact for plain LoRA with alpha = rank and, thanks to DoRA's normalisation, exact up to
    float rounding otherwise."""
    folded = dict(lora.state)
    for module, rank in lora.ranks.items():
        scale = lora.alphas[module] / rank
        if scale != 1.0:
            folded[module + _PEFT_B] = folded[module + _PEFT_B] * scale
    return {DIFFUSERS_UNET_PREFIX + k: v for k, v in folded.items()}


def kohya_file_for_diffusers(state: dict[str, Tensor], layout: UNetLayout = SDXL_UNET_LAYOUT) -> dict[str, Tensor]:
    """A state dict ``StableDiffusionXLPipeline.load_lora_weights`` accepts, from our one-file kohya LoRA.

    diffusers 0.42 reads kohya keys with SGM names itself (it maps ``input_blocks``/``middle_block``/
    ``output_blocks`` by the UNet's ``layers_per_block``) and honours ``.alpha``, but refuses non-LoRA keys, so the
    ``bundle_emb.*`` entries are dropped.
    """
    lora_keys = {k: v for k, v in state.items() if not k.startswith(BUNDLE_EMB_PREFIX)}
    kohya_to_peft(lora_keys, layout)  # refuses what diffusers would misread (unknown keys, dora_scale)
    return lora_keys


# ---------------------------------------------------------------- embeddings


def embeddings_by_trigger(embeddings: dict[str, Tensor],
                          special_params: dict[str, str]) -> dict[str, dict[str, Tensor]]:
    """Each trigger word's own rows of ``clip_l``/``clip_g``: ``{"TOK": {"clip_l": [2, 768], "clip_g": [2, 1280]}}``.

    ``special_params`` maps trigger → its tokens (``{"TOK": "<s0><s1>", "STY": "<s2>"}``); rows follow the
    ``<s0>…<sN>`` order of the embeddings, so a trigger's rows are those of its token indices. A file holding one
    trigger's dict is what A1111/Forge (``clip_l``/``clip_g`` keys), ComfyUI and InvokeAI load as one embedding.
    """
    out: dict[str, dict[str, Tensor]] = {}
    n_rows = {name: t.shape[0] for name, t in embeddings.items()}
    for trigger, tokens in special_params.items():
        rows = token_indices(tokens)
        out[trigger] = {}
        for name, table in embeddings.items():
            if max(rows) >= n_rows[name]:
                raise LoraFormatError(
                    f"trigger {trigger!r} uses token <s{max(rows)}> but {name} has {n_rows[name]} rows")
            out[trigger][name] = table[rows].contiguous()
    return out


def split_embeddings_by_trigger(embeddings: dict[str, Tensor], special_params: dict[str, str]) -> dict[str, Tensor]:
    """``bundle_emb.<trigger>.clip_l/.clip_g`` tensors (A1111's bundled embeddings): each trigger's own rows."""
    for trigger in special_params:
        if "." in trigger:
            raise LoraFormatError(f"trigger word {trigger!r} cannot be bundled: A1111 splits bundle_emb keys at dots")
    return {f"{BUNDLE_EMB_PREFIX}{trigger}.{name}": table
            for trigger, tables in embeddings_by_trigger(embeddings, special_params).items()
            for name, table in tables.items()}


def bundled_embeddings(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The inverse of :func:`split_embeddings_by_trigger`: ``({"clip_l", "clip_g"}, special_params)`` from a kohya
    file's ``bundle_emb.<trigger>.clip_l/.clip_g`` keys, tokens numbered ``<s0>…`` in the file's trigger order;
    ``({}, {})`` when it bundles none."""
    tables: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        if not key.startswith(BUNDLE_EMB_PREFIX):
            continue
        trigger, _, name = key[len(BUNDLE_EMB_PREFIX):].partition(".")
        if name not in ("clip_l", "clip_g") or value.dim() != 2:
            raise LoraFormatError(f"bundled embedding {key!r} is not bundle_emb.<trigger>.clip_l/clip_g of shape "
                                  "[tokens, width]")
        tables.setdefault(trigger, {})[name] = value
    embeddings: dict[str, list[Tensor]] = {"clip_l": [], "clip_g": []}
    special_params: dict[str, str] = {}
    next_row = 0
    for trigger, pair in tables.items():
        if set(pair) != {"clip_l", "clip_g"} or pair["clip_l"].shape[0] != pair["clip_g"].shape[0]:
            raise LoraFormatError(f"bundled embedding of {trigger!r} needs clip_l and clip_g with the same row count")
        count = pair["clip_l"].shape[0]
        special_params[trigger] = "".join(f"<s{i}>" for i in range(next_row, next_row + count))
        next_row += count
        for name in embeddings:
            embeddings[name].append(pair[name])
    if not special_params:
        return {}, {}
    return {name: torch.cat(rows) for name, rows in embeddings.items()}, special_params


EMBEDDING_KEYS = ("clip_l", "clip_g")


def read_embedding_file(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """An SDXL textual-inversion embedding file as A1111, Forge, ComfyUI and civitai use them, and as a trained
    tar's ``embeddings/<trigger>.safetensors``: ``clip_l`` [n, width] and ``clip_g`` [n, width] with the same n
    (768 and 1280 on SDXL; the consumer checks the widths against its text encoders). Other keys are ignored."""
    missing = [name for name in EMBEDDING_KEYS if name not in tensors]
    if missing:
        found = ", ".join(sorted(tensors)[:3]) + (", …" if len(tensors) > 3 else "") or "no tensors"
        raise LoraFormatError(f"not an SDXL embedding: it lacks {' and '.join(missing)} (has {found})")
    tables = {name: tensors[name] for name in EMBEDDING_KEYS}
    shapes = {name: list(table.shape) for name, table in tables.items()}
    if any(table.dim() != 2 or table.shape[0] == 0 for table in tables.values()) or \
            tables["clip_l"].shape[0] != tables["clip_g"].shape[0]:
        raise LoraFormatError(f"clip_l and clip_g must be [tokens, width] with the same token count, got {shapes}")
    return tables


@dataclass(frozen=True)
class LoraFile:
    """A bare LoRA file read into the predictor's terms: the UNet LoRA (None for a text-encoder-only file), the
    text encoders' LoRAs (by component name, canonical module names: :mod:`text_encoder_lora`), bundled embeddings,
    trigger words, and how many text-encoder keys of layouts no SDXL pipeline has were left out."""

    lora: PeftLora | None
    embeddings: dict[str, Tensor]
    special_params: dict[str, str]
    skipped_text_encoder_keys: int = 0
    text_encoder_loras: dict[str, PeftLora] = field(default_factory=dict)


# Text-encoder keys of other layouts (SD 1.x's single lora_te_, and unprefixed te_ names): counted and left out.
_OTHER_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "te_", "te1_", "te2_")
# diffusers before PEFT (LoRACompatibleLinear, 0.21-0.24): ``unet.<module>.lora.down.weight`` / ``.lora.up.weight``
_OLD_DIFFUSERS_SUFFIXES = ((".lora.down.weight", _PEFT_A), (".lora.up.weight", _PEFT_B))


def _new_diffusers_names(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Old diffusers key names (``….lora.down.weight``) as today's (``….lora_A.weight``); others unchanged."""
    renamed = {}
    for key, value in tensors.items():
        for old, new in _OLD_DIFFUSERS_SUFFIXES:
            if key.endswith(old):
                key = key[: -len(old)] + new
                break
        renamed[key] = value
    return renamed


def _read_text_encoder_keys(tensors: dict[str, Tensor], metadata: dict[str, str] | None) -> dict[str, PeftLora]:
    """The SDXL text-encoder LoRAs of a bare file: kohya ``lora_te1_``/``lora_te2_`` or diffusers
    ``text_encoder.``/``text_encoder_2.`` keys (not both)."""
    kohya = {k: v for k, v in tensors.items() if text_encoder_lora.is_kohya_key(k)}
    diffusers = {k: v for k, v in tensors.items() if text_encoder_lora.is_diffusers_key(k)}
    if kohya and diffusers:
        raise LoraFormatError(f"key {sorted(diffusers)[0]!r} is a diffusers text-encoder key beside kohya ones "
                              f"({sorted(kohya)[0]!r}): the file mixes layouts")
    if kohya:
        return text_encoder_lora.from_kohya(kohya)
    return text_encoder_lora.from_diffusers(diffusers, metadata)


def read_lora_file(tensors: dict[str, Tensor], metadata: dict[str, str] | None,
                   layout: UNetLayout = SDXL_UNET_LAYOUT) -> LoraFile:
    """A bare SDXL LoRA ``.safetensors``, as civitai and the Hugging Face hub serve them: kohya layout (SGM or
    diffusers-style names, optional ``bundle_emb`` trigger words), diffusers layout (``unet.…lora_A/lora_B`` with
    optional ``lora_adapter_metadata``, or the older ``unet.….lora.down/up``), or cog-sdxl's attention-processor
    keys (``….processor.to_q_lora.down.weight``, with or without ``unet.``).

    Text-encoder LoRA layers (many civitai SDXL LoRAs carry them) are read too: kohya ``lora_te1_``/``lora_te2_``
    and diffusers ``text_encoder.``/``text_encoder_2.`` keys (:mod:`text_encoder_lora`); text-encoder keys of
    other layouts (SD 1.x's ``lora_te_``) are left out and counted in :attr:`LoraFile.skipped_text_encoder_keys`.
    A ``dora_scale`` (LyCORIS DoRA, normalised per input column, which PEFT cannot apply) is refused, as is
    anything else that cannot be applied exactly: one-line :class:`LoraFormatError`s naming a key.
    """
    if not tensors:
        raise LoraFormatError("the file holds no tensors")
    text_encoder_loras = _read_text_encoder_keys(tensors, metadata)
    state = {k: v for k, v in tensors.items()
             if not (text_encoder_lora.is_kohya_key(k) or text_encoder_lora.is_diffusers_key(k))}
    unet_state = {k: v for k, v in state.items() if not k.startswith(_OTHER_TEXT_ENCODER_PREFIXES)}
    skipped = len(state) - len(unet_state)
    state = unet_state
    if not state:
        if text_encoder_loras:
            return LoraFile(None, {}, {}, skipped, text_encoder_loras)
        raise LoraFormatError(f"all {skipped} keys adapt a text encoder in a layout SDXL has not (e.g. "
                              f"{sorted(tensors)[0]!r}); SDXL's are lora_te1_/lora_te2_ or text_encoder(_2).")
    dora = sorted(k for k in state if k.endswith(_KOHYA_DORA))
    if dora:
        raise LoraFormatError(f"key {dora[0]!r} is a dora_scale (LyCORIS DoRA, normalised per input column), which "
                              "diffusers/PEFT cannot apply; use a plain LoRA")
    if all(k.startswith((KOHYA_PREFIX, BUNDLE_EMB_PREFIX)) for k in state):
        embeddings, special_params = bundled_embeddings(state)
        return LoraFile(kohya_to_peft(state, layout), embeddings, special_params, skipped, text_encoder_loras)
    if all(_COG_PROCESSOR_RE.match(k.removeprefix(DIFFUSERS_UNET_PREFIX)) for k in state):
        return LoraFile(cog_sdxl_lora_to_peft({k.removeprefix(DIFFUSERS_UNET_PREFIX): v for k, v in state.items()}),
                        {}, {}, skipped, text_encoder_loras)
    if all(k.startswith(DIFFUSERS_UNET_PREFIX) for k in state):
        return LoraFile(diffusers_file_to_peft(_new_diffusers_names(state), metadata), {}, {}, skipped,
                        text_encoder_loras)
    unknown = sorted(k for k in state if not k.startswith((KOHYA_PREFIX, BUNDLE_EMB_PREFIX, DIFFUSERS_UNET_PREFIX)))
    raise LoraFormatError(f"key {(unknown or sorted(state))[0]!r} is neither kohya (lora_unet_…), diffusers (unet.…) "
                          "nor cog-sdxl (….processor.…) LoRA layout, or the file mixes them")


def token_indices(tokens: str) -> list[int]:
    """``"<s0><s1>"`` → ``[0, 1]``."""
    found = re.findall(r"<s(\d+)>", tokens)
    if not found or "".join(f"<s{i}>" for i in found) != tokens.replace(" ", ""):
        raise LoraFormatError(f"tokens {tokens!r} are not of the form <s0><s1>…")
    return [int(i) for i in found]


# ---------------------------------------------------------------- replicate/cog-sdxl legacy layout

_COG_PROCESSOR_RE = re.compile(r"^(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_COG_EMBEDDING_KEYS = {"text_encoders_0": "clip_l", "text_encoders_1": "clip_g"}


def cog_sdxl_lora_to_peft(state: dict[str, Tensor]) -> PeftLora:
    """cog-sdxl ``lora.safetensors`` (LoRAAttnProcessor2_0 keys, scale 1) → PEFT layout with alpha = rank."""
    peft_state: dict[str, Tensor] = {}
    for key, value in state.items():
        match = _COG_PROCESSOR_RE.match(key)
        if not match:
            raise LoraFormatError(f"cog-sdxl LoRA key {key!r} is not <attention>.processor.to_*_lora.down/up.weight")
        attention, projection, direction = match.groups()
        module = f"{attention}.{'to_out.0' if projection == 'to_out' else projection}"
        peft_state[module + (_PEFT_A if direction == "down" else _PEFT_B)] = value
    modules = peft_modules(peft_state)
    return PeftLora(peft_state, {m: float(peft_state[m + _PEFT_A].shape[0]) for m in modules})


def cog_sdxl_embeddings(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """cog-sdxl ``embeddings.pti`` (``text_encoders_0``/``text_encoders_1``) → ``{"clip_l", "clip_g"}``."""
    missing = sorted(set(_COG_EMBEDDING_KEYS) - set(state))
    if missing:
        raise LoraFormatError(f"cog-sdxl embeddings lack {', '.join(missing)} (has {', '.join(sorted(state))})")
    return {ours: state[theirs] for theirs, ours in _COG_EMBEDDING_KEYS.items()}


def peft_to_cog_sdxl_lora(lora: PeftLora) -> dict[str, Tensor]:
    """PEFT → cog-sdxl ``lora.safetensors`` keys (to build legacy tars, e.g. test fixtures); cog-sdxl has no alpha,
    so ``alpha / rank`` is folded into the up weights. Only attention projections exist there, and no DoRA."""
    if lora.use_dora:
        raise LoraFormatError("cog-sdxl's LoRA layout has no DoRA magnitude; export a plain LoRA")
    out: dict[str, Tensor] = {}
    for module, rank in lora.ranks.items():
        match = re.match(r"^(.+\.attn[12])\.(to_q|to_k|to_v|to_out\.0)$", module)
        if not match:
            raise LoraFormatError(f"module {module!r} is not an attention projection, which is all cog-sdxl stores")
        attention, projection = match.groups()
        prefix = f"{attention}.processor.{projection.removesuffix('.0')}_lora"
        out[prefix + ".down.weight"] = lora.state[module + _PEFT_A]
        out[prefix + ".up.weight"] = lora.state[module + _PEFT_B] * (lora.alphas[module] / rank)
    return out
